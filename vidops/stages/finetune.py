"""Fine-tune: adapt a trained model to new data, by LoRA or by full fine-tuning (SFT).

The base is a vidops model folder or an MLflow model URI. The data is an encoded dataset in the
base's latent space: encoded with the base's VAE and text encoder (the lifecycle pipeline
encodes the fine-tune corpus with `--vae-from-model`), which is checked before any step runs.

- `lora`: the whole base frozen, peft LoRA adapters on the transformer's attention
  projections (`finetune.lora`), only they in the optimizer. The output folder holds the
  adapter in diffusers' format and references its base; with `merge` it is a normal model
  folder with the adapter folded in (and the adapter kept beside it).
- `sft`: every weight trained, under DeepSpeed ZeRO (`finetune.sft`; stage 2 by default),
  started under torchrun (`vidops finetune --nproc N`; gloo on CPU). The final ZeRO checkpoint
  is consolidated into a normal model folder.

Both run the one training loop through `vidops.stages.training`, with the settings of
`finetune.train` over `train`, and the base's noise schedule and objective: a model fine-tuned
with another objective than it learned would start by unlearning it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from vidops.config import Config, TrainConfig
from vidops.models.folder import (
    ADAPTER_DIR,
    EMPTY_CAPTION,
    LoadedModel,
    load_model_folder,
    merge_into_folder,
    transformer_digest,
    write_lora_folder,
    write_model_folder,
)
from vidops.models.frames import check_cogvideox_train_frames
from vidops.models.imported import resolve_model_ref
from vidops.models.lora import add_lora
from vidops.models.transformer import Denoiser
from vidops.stage import StageError
from vidops.stages.training import TrainingJob, encoded_dataset, run_training
from vidops.tracking.workdir import Workdir
from vidops.train.distributed import init_distributed, shutdown
from vidops.train.loop import ResumeMode
from vidops.train.zero import deepspeed_config

Method = Literal["lora", "sft"]
# What a fine-tune inherits from its base rather than from config: the noise process.
_FROM_BASE = ("objective", "beta_schedule", "num_train_timesteps")


def finetune(
    data_dir: Path,
    base: str | Path,
    out_dir: Path,
    *,
    cfg: Config,
    workdir: Workdir,
    method: Method | None = None,
    merge: bool = False,
    parent_run_id: str | None = None,
    resume: ResumeMode = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """Fine-tune `base` on `data_dir` into `out_dir`; returns what training.json records."""
    method = method or cfg.finetune.method
    cfg = cfg.with_overrides({"finetune.method": method})  # as MLflow params record it
    # DeepSpeed needs a process group even for one process.
    dist = init_distributed(cfg.finetune_train().device, always_group=method == "sft")
    try:
        base_dir = resolve_model_ref(base, cfg=cfg, workdir=workdir)
        # Training needs the denoiser only: the data is encoded, samples load their own VAE
        # and text encoder (a CogVideoX base's T5 alone is 4.7B parameters).
        model = load_model_folder(base_dir, dist.device, download_dir=workdir.downloads,
                                  codecs=False)
        job = _job(Path(data_dir).resolve(), Path(out_dir).resolve(), cfg, str(base),
                   base_dir.resolve(), model, method, merge, dist.world_size, dist.device)
        return run_training(job, workdir=workdir, dist=dist, parent_run_id=parent_run_id,
                            resume=resume, quiet=quiet)
    finally:
        shutdown(dist)


def check_data_fits_base(data_dir: Path, encoding: dict[str, Any], card: dict[str, Any]
                         ) -> None:
    """The data must be in the base's latent space, at the base's latent size."""
    problems = []
    if card["arch"] == "cogvideox" and card["latent"]["shape"][1] < card["video"]["frames"]:
        # A VAE that compresses time (CogVideoX's own, 4x): CogVideoX trains on 8N+1 frames.
        try:
            check_cogvideox_train_frames(int(encoding["params"]["frames"]))
        except ValueError as exc:
            problems.append(str(exc))
    if encoding["vae"]["digest"] != card["vae"]["digest"]:
        problems.append(f"it was encoded with VAE {encoding['vae']['digest'][:19]}, the base "
                        f"uses {card['vae']['digest'][:19]}")
    # The same weights and tokenizer give the same embeddings, wherever they were loaded from.
    if _digest(encoding["text_encoder"]["identity"]) != _digest(card["text_encoder"]["identity"]):
        problems.append(f"its captions were embedded by {encoding['text_encoder']['identity']}"
                        f", the base's by {card['text_encoder']['identity']}")
    if list(encoding["latent_shape"]) != list(card["latent"]["shape"]):
        problems.append(f"its latents are {encoding['latent_shape']}, the base's "
                        f"{card['latent']['shape']}")
    if problems:
        raise StageError(f"{data_dir} does not fit the base model: {'; '.join(problems)}. "
                         "Encode the fine-tune data in the base's latent space: vidops encode "
                         "--vae-from-model BASE")


def _digest(identity: str) -> str:
    return identity.rpartition("@")[2]


def finetune_train_config(cfg: Config, base_card: dict[str, Any]) -> TrainConfig:
    train = cfg.finetune_train()
    base = base_card["training"]["settings"]
    inherited = {key: base[key] for key in _FROM_BASE if key in base}
    if inherited.get("objective") == "flow_matching":
        inherited["min_snr_gamma"] = None  # no SNR weighting for flow matching
    return train.model_copy(update=inherited)


def _job(data_dir: Path, out_dir: Path, cfg: Config, base_ref: str, base_dir: Path,
         model: LoadedModel, method: Method, merge: bool, world_size: int,
         device: Any) -> TrainingJob:
    _, _, encoding = encoded_dataset(data_dir)
    card = model.card
    if not (base_dir / "transformer").is_dir():  # an adapter folder: base + LoRA
        raise StageError(f"{base_ref} is itself a LoRA fine-tune: fine-tune its base, or "
                         "re-run that fine-tune with --merge for a model to build on")
    check_data_fits_base(data_dir, encoding, card)
    train = finetune_train_config(cfg, card)
    denoiser = model.denoiser.train()
    denoiser.requires_grad_(method == "sft")
    lora = cfg.finetune.lora
    settings: dict[str, Any] = {"method": method, "base": transformer_digest(base_dir)}
    base_info = {
        "path": str(base_dir),
        # An MLflow URI of the base, so the adapter can find it on another machine.
        "uri": base_ref if "://" in base_ref or base_ref.startswith(("models:/", "runs:/"))
        else (f"runs:/{card['mlflow_run_id']}/model" if card.get("mlflow_run_id") else None),
        "transformer_digest": settings["base"],
        "mlflow_run_id": card.get("mlflow_run_id"),
        "data": card.get("data"),
    }
    extra_card: dict[str, Any] = {"method": method, "base": base_info}
    deepspeed = None
    if method == "lora":
        torch.manual_seed(cfg.seed)  # the same adapter initialisation on every rank and re-run
        add_lora(denoiser.transformer, lora)
        settings["lora"] = lora.model_dump(mode="json")
        extra_card["adapter"] = {"rank": lora.rank, "alpha": lora.scale_alpha,
                                 "dropout": lora.dropout, "targets": list(lora.targets)}
    else:
        train = train.model_copy(update={
            "gradient_checkpointing": cfg.finetune.sft.gradient_checkpointing})
        deepspeed = deepspeed_config(cfg.finetune.sft, train, world_size, device)
        settings["deepspeed"] = deepspeed
        extra_card["deepspeed"] = {"zero_stage": cfg.finetune.sft.zero_stage,
                                   "offload_optimizer": cfg.finetune.sft.offload_optimizer}
    vae_dir = base_dir / "vae" if (base_dir / "vae").is_dir() else None

    def save(out: Path, trained: Denoiser, final_card: dict[str, Any]) -> None:
        if method == "lora":
            write_lora_folder(out, denoiser=trained, base_dir=base_dir, card=final_card)
            if merge:
                merged = load_model_folder(out)
                merge_into_folder(merged, out, final_card)
        else:
            write_model_folder(out, denoiser=trained, scheduler_config=model.scheduler_config,
                               empty_caption=base_dir / EMPTY_CAPTION, card=final_card,
                               vae_dir=vae_dir)

    return TrainingJob(
        stage="finetune", data_dir=data_dir, out_dir=out_dir, cfg=cfg, train=train,
        denoiser=denoiser, text_encoder=card["text_encoder"], vae=card["vae"],
        vae_source=vae_dir or card["vae"]["path"], scheduler_config=model.scheduler_config,
        save=save, settings=settings, card=extra_card,
        params={"base_model": base_ref}, deepspeed=deepspeed)


__all__ = ["ADAPTER_DIR", "check_data_fits_base", "finetune", "finetune_train_config"]
