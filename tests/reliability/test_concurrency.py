"""Concurrent runs on one workdir: `vidops run` serialises on a lock that says whose run it
waits for, and a killed holder never leaves the workdir locked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vidops.pipelines.local import RUN_LOCK
from vidops.tracking.workdir import Workdir

pytestmark = pytest.mark.reliability

# Holds the run lock until the file argv[2] exists (or for ever, for "-").
_HOLD = """
import os, sys, time
from vidops.pipelines.local import exclusive_run
from vidops.tracking.workdir import Workdir
with exclusive_run(Workdir.at(sys.argv[1])):
    print("acquired", flush=True)
    while sys.argv[2] != "" and not os.path.exists(sys.argv[2]):
        time.sleep(0.1)
print("released", flush=True)
"""


def _start(root: Path, until: Path | str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _HOLD, str(root), str(until)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen[str], line: str, timeout: float = 60) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = proc.stdout.readline().strip()
        if got == line:
            return
        if not got and proc.poll() is not None:
            break
    raise AssertionError(f"no {line!r} from pid {proc.pid}: {proc.stderr.read()}")


def test_a_second_run_waits_for_the_first_and_says_whose(tmp_path: Path) -> None:
    root = Workdir.at(tmp_path / "work").root
    release = tmp_path / "release"
    first = _start(root, release)
    _wait_for(first, "acquired")
    second = _start(root, "")
    # The second says it waits, and for whom (the first run's pid), and waits.
    assert second.stderr is not None
    said = second.stderr.readline()
    assert f"is in use by another vidops run (pid {first.pid} on" in said
    time.sleep(1)
    assert second.poll() is None
    release.touch()
    _wait_for(second, "acquired")  # only once the first let go
    _wait_for(second, "released")
    first_out, _ = first.communicate(timeout=30)
    second.communicate(timeout=30)
    assert "released" in first_out
    assert first.returncode == second.returncode == 0


def test_a_run_killed_by_sigkill_leaves_the_workdir_unlocked(tmp_path: Path) -> None:
    root = Workdir.at(tmp_path / "work").root
    holder = _start(root, tmp_path / "never")
    _wait_for(holder, "acquired")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert (root / RUN_LOCK).is_file()  # the file stays; the lock went with the process
    started = time.monotonic()
    successor = _start(root, "")
    _wait_for(successor, "released")
    successor.communicate(timeout=30)
    assert time.monotonic() - started < 30
