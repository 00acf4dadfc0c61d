"""The stage contract: one mechanism that every data stage runs through.

A stage body turns its inputs into two tables, `kept` and `rejected`, and writes the media
the kept rows point to. `run_stage` does everything else, the same way for every stage:

1. builds the output in a hidden sibling directory (`.<out>.partial-<pid>-<id>`), so a stage
   killed at any point leaves nothing at the output path that a re-run or a later stage
   could mistake for a result;
2. checks the accounting `input == kept + rejected` and that every rejection has a known
   reason code;
3. writes manifest.parquet and rejected.parquet, versions the directory with DVC and pushes
   it to the remote, records an MLflow run with the resolved config, counts and dataset;
4. writes stage.json last and renames the finished directory into place in one step.

An output directory without a complete stage.json is never trusted (`load_output` refuses it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from vidops.config import Config
from vidops.data.manifest import REJECTED_COLUMNS, Reason, read_table, write_table
from vidops.tracking import dvc as dvc_tracking
from vidops.tracking import mlflow_runs
from vidops.tracking.workdir import Workdir, code_version

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
REJECTED = "rejected.parquet"
STAGE_JSON = "stage.json"
STATUS_COMPLETE = "complete"


class StageError(RuntimeError):
    """A stage could not produce a trustworthy output."""


class AccountingError(StageError):
    """Inputs went missing or were counted twice: input != kept + rejected."""


@dataclass
class StageContext:
    """What a stage body gets: its config, where to write media, and its input."""

    name: str
    cfg: Config
    workdir: Workdir
    out_dir: Path  # the (temporary) directory the body writes its media into
    in_dir: Path | None
    quiet: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def input_manifest(self) -> pd.DataFrame:
        if self.in_dir is None:
            raise StageError(f"stage {self.name} has no input directory")
        manifest, _ = load_output(self.in_dir)
        return manifest

    @contextmanager
    def timed(self, label: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[label] = self.timings.get(label, 0.0) + time.perf_counter() - start


@dataclass
class StageOutcome:
    """A stage body's result. `kept` rows point at media by paths relative to out_dir."""

    input_count: int
    kept: pd.DataFrame
    rejected: pd.DataFrame
    input_digest: str
    extra: dict[str, Any] = field(default_factory=dict)


StageBody = Callable[[StageContext], StageOutcome]


def load_output(directory: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A finished stage output: its manifest and stage.json. Incomplete outputs are refused."""
    directory = Path(directory)
    stage_file = directory / STAGE_JSON
    if not stage_file.is_file():
        raise StageError(f"{directory} is not a finished stage output (no {STAGE_JSON})")
    info = json.loads(stage_file.read_text(encoding="utf-8"))
    if info.get("status") != STATUS_COMPLETE:
        raise StageError(
            f"{directory} is not a finished stage output (status {info.get('status')!r})")
    return read_table(directory / MANIFEST), info


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out_dir: Path) -> None:
    """Partial outputs of stages that died (their process is gone) are deleted."""
    for leftover in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        try:
            pid = int(leftover.name.rsplit(".", 1)[-1].split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or not _pid_alive(pid):
            shutil.rmtree(leftover, ignore_errors=True)


def _check_accounting(name: str, outcome: StageOutcome) -> dict[str, int]:
    kept, rejected = len(outcome.kept), len(outcome.rejected)
    if outcome.input_count != kept + rejected:
        raise AccountingError(
            f"stage {name}: {outcome.input_count} inputs but {kept} kept + {rejected} rejected"
        )
    missing = set(REJECTED_COLUMNS) - set(outcome.rejected.columns)
    if missing:
        raise StageError(f"stage {name}: rejected table lacks columns {sorted(missing)}")
    known = {reason.value for reason in Reason}
    unknown = set(outcome.rejected["reason"].astype(str)) - known
    if unknown:
        raise StageError(f"stage {name}: unknown reason codes {sorted(unknown)}")
    return dict(sorted(Counter(outcome.rejected["reason"].astype(str)).items()))


def _commit(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by tmp. Each rename is atomic; a kill between them leaves no output
    (and a hidden .old directory that the next run removes), never a mixed one."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_stage(
    name: str,
    body: StageBody,
    *,
    cfg: Config,
    workdir: Workdir,
    out_dir: Path,
    in_dir: Path | None = None,
    parent_run_id: str | None = None,
    experiment: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run one stage under the contract and return its stage.json content."""
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    started_at = datetime.now(timezone.utc)
    clock = time.perf_counter()
    experiment = experiment or cfg.tracking.experiments.curation
    try:
        with mlflow_runs.stage_run(cfg, workdir, name, experiment, parent_run_id) as run:
            ctx = StageContext(name, cfg, workdir, tmp, Path(in_dir).resolve() if in_dir else None,
                               quiet)
            with ctx.timed("body"):
                outcome = body(ctx)
            by_reason = _check_accounting(name, outcome)

            with ctx.timed("write"):
                write_table(outcome.kept, tmp / MANIFEST)
                write_table(outcome.rejected[REJECTED_COLUMNS], tmp / REJECTED)
            with ctx.timed("dvc"):
                version = dvc_tracking.version_directory(workdir, tmp, name, cfg.dvc.remote)

            counts = {"input": outcome.input_count, "kept": len(outcome.kept),
                      "rejected": len(outcome.rejected), "by_reason": by_reason}
            info = {
                "stage": name,
                "status": STATUS_COMPLETE,
                "code_version": code_version(),
                "started_at": started_at.isoformat(),
                "finished_at": datetime.now(timezone.utc).isoformat(),
                "duration_s": round(time.perf_counter() - clock, 3),
                "timings_s": {k: round(v, 3) for k, v in ctx.timings.items()},
                "params": cfg.to_dict(),
                "input": {"dir": str(ctx.in_dir) if ctx.in_dir else None,
                          "digest": outcome.input_digest},
                "output": {"dir": str(out_dir), "manifest": MANIFEST, "rejected": REJECTED},
                "counts": counts,
                "dvc": version.to_dict(),
                "mlflow": {"tracking_uri": mlflow_runs.redact(mlflow.get_tracking_uri()),
                           "experiment": experiment,
                           "experiment_id": run.info.experiment_id,
                           "run_id": run.info.run_id,
                           "parent_run_id": parent_run_id or None},
                **outcome.extra,
            }
            (tmp / STAGE_JSON).write_text(json.dumps(info, indent=2, default=str) + "\n",
                                          encoding="utf-8")

            mlflow.log_metrics({"input": counts["input"], "kept": counts["kept"],
                                "rejected": counts["rejected"], "duration_s": info["duration_s"],
                                **{f"rejected_{k}": v for k, v in by_reason.items()}})
            mlflow.set_tags({"vidops.code_version": info["code_version"],
                             "vidops.dvc_md5": version.md5, "vidops.output_dir": str(out_dir)})
            mlflow_runs.log_dataset(outcome.kept, name=name, digest=version.md5,
                                    source=version.object_uri, context="output")
            for artifact in (STAGE_JSON, MANIFEST, REJECTED):
                mlflow_runs.log_file(tmp / artifact)
            _commit(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: %d in, %d kept, %d rejected -> %s", name, counts["input"], counts["kept"],
             counts["rejected"], out_dir)
    return info
