"""LoRA adapters on a denoiser's transformer, in diffusers' LoRA file format.

peft injects the adapters (`inject_adapter_in_model`), so the same code serves Latte, which
has no diffusers adapter mixin, and CogVideoX, which has one. Adapters are saved the way
diffusers' own LoRA training scripts save them: `pytorch_lora_weights.safetensors`, keys
prefixed `transformer.`, the LoRA settings in its metadata, so a diffusers pipeline of the same
transformer class loads the file with `load_lora_weights`. `adapter_config.json` beside it
repeats the settings for people and for vidops' own loader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import CogVideoXPipeline
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from vidops.config import LoraConfig

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER = "default"
PREFIX = "transformer."


class AdapterError(ValueError):
    """An adapter file that does not fit the model it is applied to."""


def peft_config(cfg: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.scale_alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.targets), init_lora_weights=True)


def add_lora(transformer: torch.nn.Module, cfg: LoraConfig | PeftLoraConfig) -> int:
    """Freeze `transformer` and inject trainable LoRA adapters; returns how many modules got
    one. A target list that matches nothing is an error, not a silent full freeze."""
    config = peft_config(cfg) if isinstance(cfg, LoraConfig) else cfg
    transformer.requires_grad_(False)
    try:
        inject_adapter_in_model(config, transformer, adapter_name=ADAPTER)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise AdapterError(f"LoRA targets {sorted(config.target_modules)} match no module of "
                           f"{type(transformer).__name__}: {exc}") from None
    return sum(isinstance(m, LoraLayer) for m in transformer.modules())


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights alone, keyed as peft saves them (no adapter name)."""
    return {k: v.detach().cpu().contiguous()
            for k, v in get_peft_model_state_dict(transformer, adapter_name=ADAPTER).items()}


def _settings(config: PeftLoraConfig) -> dict[str, Any]:
    return {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "target_modules": sorted(config.target_modules)}


def save_lora(transformer: torch.nn.Module, out_dir: Path, extra: dict[str, Any] | None = None
              ) -> Path:
    """Write `transformer`'s adapter into `out_dir` in diffusers' format; returns the file."""
    config = transformer.peft_config[ADAPTER]
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings(config)
    # CogVideoXPipeline's writer is LoraBaseMixin's with the `transformer` prefix: nothing in
    # it is specific to CogVideoX, and using it keeps the file byte-for-byte diffusers' own.
    CogVideoXPipeline.save_lora_weights(out_dir, transformer_lora_layers=lora_state_dict(
        transformer), transformer_lora_adapter_metadata=settings)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(
        {**settings, "weights": LORA_WEIGHTS, "transformer_class": type(transformer).__name__,
         **(extra or {})}, indent=2) + "\n")
    return out_dir / LORA_WEIGHTS


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{adapter_dir} holds no LoRA adapter ({ADAPTER_CONFIG} missing)")
    return json.loads(path.read_text(encoding="utf-8"))


def load_lora(transformer: torch.nn.Module, adapter_dir: Path, scale: float = 1.0) -> None:
    """Inject the adapter saved in `adapter_dir` into `transformer` at `scale` (1: as trained,
    0: the base model)."""
    settings = read_adapter_config(adapter_dir)
    expected = settings.get("transformer_class")
    if expected and expected != type(transformer).__name__:
        raise AdapterError(f"{adapter_dir} adapts a {expected}, not a "
                           f"{type(transformer).__name__}")
    weights = load_file(str(Path(adapter_dir) / settings.get("weights", LORA_WEIGHTS)))
    state = {k.removeprefix(PREFIX): v for k, v in weights.items()}
    add_lora(transformer, PeftLoraConfig(
        r=settings["r"], lora_alpha=settings["lora_alpha"], lora_dropout=0.0,
        target_modules=settings["target_modules"]))
    result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    lora_missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
    if unexpected or lora_missing:
        raise AdapterError(f"{adapter_dir} does not fit this transformer: "
                           f"{len(unexpected)} unexpected, {len(lora_missing)} missing adapter "
                           f"weights (e.g. {(unexpected or lora_missing)[0]})")
    set_lora_scale(transformer, scale)
    transformer.requires_grad_(False)


def set_lora_scale(transformer: torch.nn.Module, scale: float) -> None:
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(ADAPTER, scale)


def merge_lora(transformer: torch.nn.Module) -> None:
    """Fold every adapter into its base weight (at its current scale) and remove the adapter
    modules, leaving a plain transformer of the original class and state-dict keys."""
    for name, module in list(transformer.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = transformer.get_submodule(parent_name) if parent_name else transformer
            setattr(parent, child, module.get_base_layer())
    if hasattr(transformer, "peft_config"):
        del transformer.peft_config
    # diffusers marks models with injected adapters; a merged model is a plain one again.
    if getattr(transformer, "_hf_peft_config_loaded", False):
        transformer._hf_peft_config_loaded = False
