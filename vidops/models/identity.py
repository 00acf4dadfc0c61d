"""Content digests of models: what caches and lineage record as a model's identity."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch


def model_digest(
    config: Mapping[str, Any], state: Mapping[str, torch.Tensor], extra: Iterable[str] = ()
) -> str:
    """sha256 over the config (as sorted JSON) and every tensor's name, dtype, shape and bytes.

    Keys starting with `_` and library versions are left out: they say which code saved the
    model (`_diffusers_version`, `_name_or_path`), not what the model computes.
    """
    digest = hashlib.sha256()
    kept = {k: v for k, v in config.items() if not k.startswith("_") and not k.endswith("_version")}
    digest.update(json.dumps(kept, sort_keys=True, default=str).encode("utf-8"))
    for item in extra:
        digest.update(item.encode("utf-8"))
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(state[name].shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()
