"""Files: placed into stage outputs without copying bytes when it can be helped, records
written so that a reader never sees half of one, and locks between processes."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link src to dst (no bytes copied, same content); copy across filesystems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_tree(src: Path, dst: Path) -> None:
    """Every file under src placed at the same place under dst by `link_or_copy`."""
    for path in sorted(Path(src).rglob("*")):
        if path.is_file():
            link_or_copy(path, Path(dst) / path.relative_to(src))


@contextmanager
def exclusive_lock(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_file` (created if missing): one process at a time in
    a section that creates a shared artefact (a VAE bootstrap, an imported base)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json_atomic(path: Path, record: Any, **dumps: Any) -> Path:
    """Write `record` as JSON to `path` through a temporary file renamed into place: a
    process killed while writing leaves the previous record (or none), never a torn one
    that a later step would read. The temporary name carries the writer's pid, so two
    writers never share one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, **{"indent": 2, **dumps}) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
