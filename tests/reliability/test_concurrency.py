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


@pytest.mark.slow
def test_two_vidops_runs_at_once_on_one_workdir_serialise_and_leave_the_stores_sound(
        tmp_path: Path) -> None:
    """The real thing: two `vidops run` of the tiny lifecycle started together on one workdir
    (about ten minutes on two cores)."""
    import json
    import sqlite3

    from mlflow.tracking import MlflowClient

    from .kill_rerun import _run_args, _vidops, write_corpus

    corpus, work = tmp_path / "corpus", tmp_path / "work"
    write_corpus(corpus)
    command = _vidops(work, *_run_args(corpus))
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while f"pid {first.pid} " not in ((work / RUN_LOCK).read_text()
                                      if (work / RUN_LOCK).is_file() else ""):
        assert time.monotonic() < deadline and first.poll() is None, first.stderr
        time.sleep(0.2)
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    _, first_err = first.communicate(timeout=1800)
    _, second_err = second.communicate(timeout=1800)
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 0, second_err[-3000:]
    assert f"is in use by another vidops run (pid {first.pid} on" in second_err

    # The MLflow store is a sound database; the registry has one champion, which passed its
    # gates; both runs trained on the same dataset versions (nothing interleaved).
    with sqlite3.connect(work / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("vidgen", "champion")
    assert champion.tags["vidops.gates_passed"] == "True"
    versions = [client.get_model_version("vidgen", v.version)
                for v in client.search_model_versions("name='vidgen'")]
    assert sum("champion" in v.aliases for v in versions) == 1
    by_kind: dict[str, set[str]] = {}
    for version in versions:
        datasets = json.loads(version.tags["vidops.datasets"])
        by_kind.setdefault(version.tags.get("vidops.kind", ""), set()).add(
            json.dumps(sorted(d["dvc_md5"] for d in datasets)))
    assert len(versions) == 4 and all(len(md5s) == 1 for md5s in by_kind.values()), by_kind
    # ... and every DVC object and source the champion's lineage names is there, unchanged.
    verify = subprocess.run(_vidops(work, "lineage", "models:/vidgen@champion", "--verify",
                                    "--out", str(tmp_path / "lineage")),
                            capture_output=True, text=True, timeout=600)
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
