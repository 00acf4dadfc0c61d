"""Placing media files into stage outputs without copying bytes when it can be helped."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link src to dst (no bytes copied, same content); copy across filesystems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def move(src: Path, dst: Path) -> None:
    """Move src to dst, creating dst's folder."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dst))


def pid_alive(pid: int) -> bool:
    """Whether a process of this host still runs: temporary files named after a dead writer
    are leftovers a later run may delete."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
