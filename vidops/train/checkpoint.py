"""Training checkpoints: everything a run needs to continue exactly where it stopped.

Each checkpoint is a directory `step-<N>` holding `state.pt`: model, EMA, optimizer and LR
scheduler states, the step, the data position, every rank's RNG states (torch, CUDA, numpy,
python) and the digest of the settings that shape training. It is written to a hidden
temporary directory and renamed into place, so a kill mid-write leaves the previous
checkpoint as the latest one; the oldest beyond `keep` are deleted after a save succeeds.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
_NAME = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest(folder: Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1][1] if found else None


def save(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    torch.save(state, tmp / STATE_FILE)
    with open(tmp / STATE_FILE, "rb") as handle:
        os.fsync(handle.fileno())
    target = folder / f"step-{step:08d}"
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    for _, old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load(path: Path) -> dict[str, Any]:
    # weights_only=False: the state holds numpy and python RNG states; checkpoints are this
    # run's own files, never downloaded.
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
