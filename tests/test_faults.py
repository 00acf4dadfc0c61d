"""The fault-injection hook the crash-safety tests kill stages with (vidops/faults.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from vidops import faults

_PASS_TWICE = """
from vidops import faults
for _ in range(3):
    faults.point("filter.item")
    print("passed", flush=True)
"""


# A stage's progress bar is its item fault point, shown or not (`--quiet`).
_STAGE_ITEMS = """
from vidops.stage import ItemProgress
bar = ItemProgress("encode", total=3, unit="clip", quiet=True)
for _ in range(3):
    bar.update()
    print("passed", flush=True)
"""


def _run(spec: str | None, program: str = _PASS_TWICE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    if spec is not None:
        env[faults.ENV] = spec
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          env=env, timeout=120)


def test_parse_reads_points_and_pass_counts() -> None:
    assert faults.parse("filter.item@2, train.step") == {"filter.item": 2, "train.step": 1}
    assert faults.parse("") == {}
    for bad in ("filter.item@0", "filter.item@x", "@2"):
        with pytest.raises(ValueError, match="VIDOPS_FAULT"):
            faults.parse(bad)


def test_the_process_dies_by_sigkill_on_the_nth_pass_and_only_there() -> None:
    killed = _run("filter.item@2")
    assert killed.returncode == -signal.SIGKILL
    assert killed.stdout.split() == ["passed"]
    assert "SIGKILL at filter.item (pass 2)" in killed.stderr
    for spec in (None, "ingest.item", "filter.item@4"):
        alive = _run(spec)
        assert alive.returncode == 0 and alive.stdout.split() == ["passed"] * 3, spec


def test_a_stage_progress_update_is_its_item_fault_point() -> None:
    killed = _run("encode.item@3", _STAGE_ITEMS)
    assert killed.returncode == -signal.SIGKILL
    assert killed.stdout.split() == ["passed"] * 2
    assert _run("filter.item@1", _STAGE_ITEMS).stdout.split() == ["passed"] * 3
