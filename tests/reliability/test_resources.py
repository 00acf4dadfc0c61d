"""Resource bounds: a disk that fills during a stage fails that stage cleanly (a clear error,
no partial output for a later stage to read, and a rerun with space succeeds); peak memory
does not grow with the corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability


def _vidops(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vidops.cli", "--quiet", *args],
                          capture_output=True, text=True, timeout=900)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 MB tmpfs (root only); the test is skipped where this machine cannot mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_fails_the_stage_cleanly_and_a_rerun_with_space_succeeds(
        small_disk: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    made = _vidops("samples", str(corpus), "--kind", "shapes", "--count", "12")
    assert made.returncode == 0, made.stderr
    work = small_disk / "work"
    # The workdir's stores exist (a first stage ran); then the disk is all but full.
    first = sorted(corpus.glob("*.mp4"))[0]
    warm = _vidops("--workdir", str(work), "ingest", "--source", str(first),
                   "--out", str(work / "data" / "warm"))
    assert warm.returncode == 0, warm.stderr[-2000:]
    ballast = small_disk / "ballast"
    with open(ballast, "wb") as fill:
        try:
            while True:
                fill.write(b"\0" * 2**16)
                fill.flush()
        except OSError:
            pass
    subprocess.run(["truncate", "-s", f"-{48 * 2**10}", str(ballast)], check=True)

    full = _vidops("--workdir", str(work), "ingest", "--source", str(corpus))
    assert full.returncode == 2, full.stderr[-2000:]
    # The run ends on vidops's own message, not a crash (MLflow may log its traceback first).
    assert full.stderr.strip().splitlines()[-1].startswith(
        "vidops: error: no space left on device"), full.stderr[-2000:]
    data = work / "data"
    # Nothing a later stage could read: no output, no partial output left behind.
    assert not (data / "ingest").exists()
    assert not list(data.glob(".*partial*"))

    ballast.unlink()  # space again
    rerun = _vidops("--workdir", str(work), "ingest", "--source", str(corpus))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    info = json.loads((data / "ingest" / "stage.json").read_text())
    assert info["counts"]["input"] == info["counts"]["kept"] == 12


def _peak_rss_mb(*args: str) -> float:
    """Peak resident memory of `vidops *args` and everything it started, in MB."""
    probe = ("import resource, subprocess, sys; "
             "code = subprocess.call(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "vidops.cli",
                           "--quiet", *args], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1]) / 1024


@pytest.mark.slow
def test_peak_memory_of_ingest_and_filter_does_not_grow_with_a_tenfold_corpus(
        tmp_path: Path) -> None:
    peaks = {}
    for count in (6, 60):
        corpus = tmp_path / f"corpus-{count}"
        assert _vidops("samples", str(corpus), "--kind", "shapes", "--count",
                       str(count)).returncode == 0
        work = tmp_path / f"work-{count}"
        ingest = _peak_rss_mb("--workdir", str(work), "ingest", "--source", str(corpus))
        filtered = _peak_rss_mb("--workdir", str(work), "filter")
        peaks[count] = {"ingest": ingest, "filter": filtered}
    print(json.dumps(peaks))
    for stage in ("ingest", "filter"):
        assert peaks[60][stage] <= 1.2 * peaks[6][stage], peaks
