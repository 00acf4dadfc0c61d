"""The stage contract: accounting, atomic outputs, refusal of incomplete outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from vidops.config import Config
from vidops.data.manifest import rejected_frame
from vidops.stage import (
    AccountingError,
    StageContext,
    StageError,
    StageOutcome,
    load_output,
    run_stage,
)


def _outcome(ctx: StageContext, n_in: int, n_kept: int, reason: str = "blurry") -> StageOutcome:
    (ctx.out_dir / "media").mkdir()
    (ctx.out_dir / "media" / "a.bin").write_bytes(b"payload")
    kept = pd.DataFrame({"id": [f"k{i}" for i in range(n_kept)],
                         "path": ["media/a.bin"] * n_kept})
    rejected = rejected_frame([{"id": "r", "source_uri": "x", "source_sha256": None,
                                "reason": reason, "detail": "test"}])
    return StageOutcome(n_in, kept, rejected, input_digest="test")


def test_accounting_must_hold(cfg, workdir, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(AccountingError, match="3 inputs but 1 kept \\+ 1 rejected"):
        run_stage("unit", lambda ctx: _outcome(ctx, 3, 1), cfg=cfg, workdir=workdir, out_dir=out)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*")), "the partial output is removed"


def test_unknown_reason_code_is_refused(cfg, workdir, tmp_path: Path) -> None:
    with pytest.raises(StageError, match="unknown reason codes"):
        run_stage("unit", lambda ctx: _outcome(ctx, 2, 1, reason="ugly"), cfg=cfg,
                  workdir=workdir, out_dir=tmp_path / "out")


def test_success_writes_contract_files_and_a_failed_rerun_keeps_them(
    cfg, workdir, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    info = run_stage("unit", lambda ctx: _outcome(ctx, 3, 2), cfg=cfg, workdir=workdir,
                     out_dir=out)
    assert {p.name for p in out.iterdir()} == {"manifest.parquet", "rejected.parquet",
                                              "stage.json", "media"}
    manifest, on_disk = load_output(out)
    assert on_disk == json.loads(json.dumps(info, default=str))
    assert len(manifest) == 2
    assert info["counts"] == {"input": 3, "kept": 2, "rejected": 1, "by_reason": {"blurry": 1}}
    assert info["params"] == cfg.to_dict()
    assert info["dvc"]["md5"].endswith(".dir") and info["mlflow"]["run_id"]

    def explode(ctx: StageContext) -> StageOutcome:
        (ctx.out_dir / "half-written").write_text("...")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_stage("unit", explode, cfg=cfg, workdir=workdir, out_dir=out)
    assert load_output(out)[1]["mlflow"]["run_id"] == info["mlflow"]["run_id"]
    assert not (out / "half-written").exists()


def test_the_remote_keeps_each_object_once_and_others_uploads_alone(
    cfg, workdir, tmp_path: Path
) -> None:
    """`dvc add --to-remote` leaves a temporary copy of each file it uploads in the remote
    (DVC #10783); the stage removes its own, and only its own."""
    objects = workdir.dvc_remote / "files" / "md5"
    objects.mkdir(parents=True)
    in_flight = objects / ".another-upload.tmp"  # another workdir's upload, half-written
    in_flight.write_bytes(b"not one of this stage's files")
    info = run_stage("unit", lambda ctx: _outcome(ctx, 3, 2), cfg=cfg, workdir=workdir,
                     out_dir=tmp_path / "out")
    assert sorted(objects.glob(".*.tmp")) == [in_flight]
    md5 = info["dvc"]["md5"]
    listing = json.loads((objects / md5[:2] / md5[2:]).read_text())
    for entry in listing:  # every file of the version is on the remote, under its address
        assert (objects / entry["md5"][:2] / entry["md5"][2:]).is_file(), entry


def test_incomplete_output_is_not_trusted(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.parquet").write_bytes(b"")
    with pytest.raises(StageError, match="not a finished stage output"):
        load_output(out)


KILLED_STAGE = """
import sys, time
from pathlib import Path
from vidops.config import load_config
from vidops.stage import run_stage
from vidops.tracking.workdir import Workdir

def body(ctx):
    (ctx.out_dir / "media").mkdir()
    (ctx.out_dir / "media" / "partial.bin").write_bytes(b"x" * 1000)
    print("WRITING", flush=True)
    time.sleep(60)

run_stage("unit", body, cfg=load_config("tiny"), workdir=Workdir.at(sys.argv[1]),
          out_dir=Path(sys.argv[2]))
"""


def test_sigkilled_stage_leaves_nothing_a_rerun_would_trust(cfg, workdir, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_STAGE, str(workdir.root), str(out)],
                            stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while proc.stdout.readline().strip() != "WRITING":
        assert time.time() < deadline and proc.poll() is None, "stage did not start"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = list(tmp_path.glob(".out.partial-*"))
    assert leftovers, "the killed stage was writing into a hidden partial directory"

    info = run_stage("unit", lambda ctx: _outcome(ctx, 2, 1), cfg=cfg, workdir=workdir,
                     out_dir=out)
    assert info["counts"]["kept"] == 1
    assert not list(tmp_path.glob(".out.partial-*")), "the re-run cleans up the dead partial"
    assert not (out / "media" / "partial.bin").exists()


def test_a_passed_validation_is_reused_for_identical_data(cfg: Config, tmp_path: Path) -> None:
    from tests.test_quality import manifest_for
    from vidops.tracking.workdir import Workdir

    workdir = Workdir.at(tmp_path / "work")

    def stage(manifest: pd.DataFrame, out: str) -> dict[str, Any]:
        return run_stage("filter", lambda ctx: StageOutcome(len(manifest), manifest,
                                                            rejected_frame([]), "test"),
                         cfg=cfg, workdir=workdir, out_dir=tmp_path / out, quiet=True)

    manifest = manifest_for("filter")
    first, second = stage(manifest, "a"), stage(manifest, "b")
    assert "reused" not in first["validation"] and second["validation"]["reused"]
    assert second["validation"]["success"] and second["validation"]["evaluated"] > 10
    assert ((tmp_path / "b" / "validation.json").read_bytes()
            == (tmp_path / "a" / "validation.json").read_bytes())
    assert (tmp_path / "b" / "data_docs" / "index.html").is_file()
    # Other data is validated afresh.
    assert "reused" not in stage(manifest.iloc[1:], "c")["validation"]
