"""Pluggable captioners: what writes a caption for a clip that arrived without one.

Anything with a `name`, a `version` and `caption(frames) -> str` is a captioner (the
`Captioner` protocol), so a library user or a test can pass its own. `load_captioner` turns a
config value (`annotate.captioner`) into one: a transformers "image-to-text" pipeline loaded
from a local directory or a hub id. transformers is imported only then, so the rest of vidops
neither needs it installed nor pays its import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

# Enough for one descriptive sentence; image-to-text models ramble or repeat beyond it.
MAX_NEW_TOKENS = 48


class CaptionerError(RuntimeError):
    """A captioner could not be loaded or failed; the message names the model."""


@runtime_checkable
class Captioner(Protocol):
    """Writes a caption for a clip from a few of its frames (RGB uint8, in time order)."""

    name: str  # recorded as the clip's caption_model
    version: str  # recorded with the name in the clip's annotators

    def caption(self, frames: list[np.ndarray]) -> str: ...


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


class TransformersCaptioner:
    """A transformers image-to-text pipeline (BLIP, GIT, ...) captioning a clip's middle frame."""

    def __init__(self, spec: str, *, max_new_tokens: int = MAX_NEW_TOKENS) -> None:
        try:
            import transformers
        except ImportError as exc:
            raise CaptionerError(
                f"annotate.captioner is {spec!r}, but the transformers package is not "
                "installed (pip install transformers), or set annotate.captioner to null"
            ) from exc
        local = Path(spec).expanduser()
        model = str(local.resolve()) if local.exists() else spec
        try:
            import torch

            device = 0 if torch.cuda.is_available() else -1
            # Hub access follows huggingface_hub's own settings (HF_HUB_OFFLINE, HF_HOME,
            # HF_TOKEN): a cluster pod without egress sets HF_HUB_OFFLINE=1 and a local path.
            self._pipe: Any = transformers.pipeline("image-to-text", model=model, device=device)
        except Exception as exc:
            hint = (" (HF_HUB_OFFLINE is set, so only a local directory or a model already in "
                    "the hub cache can load)") if _offline() else ""
            raise CaptionerError(f"cannot load captioner {spec!r}: {exc}{hint}") from exc
        self.name = spec
        revision = getattr(getattr(self._pipe, "model", None), "config", None)
        commit = getattr(revision, "_commit_hash", None)
        self.version = str(commit) if commit else f"transformers-{transformers.__version__}"
        self._max_new_tokens = max_new_tokens

    def caption(self, frames: list[np.ndarray]) -> str:
        if not frames:
            raise CaptionerError(f"captioner {self.name!r} was given no frames")
        from PIL import Image

        image = Image.fromarray(frames[len(frames) // 2])
        try:
            out = self._pipe(image, generate_kwargs={"max_new_tokens": self._max_new_tokens})
        except Exception as exc:
            raise CaptionerError(f"captioner {self.name!r} failed: {exc}") from exc
        if isinstance(out, list) and out and isinstance(out[0], list):
            out = out[0]
        return str(out[0].get("generated_text", "")) if out else ""


def load_captioner(spec: str | None) -> Captioner | None:
    """The captioner a config names (local path or hub id), or None when it names none."""
    if spec is None or not str(spec).strip():
        return None
    return TransformersCaptioner(str(spec).strip())
