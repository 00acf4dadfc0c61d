"""The stage contract: one mechanism that every data stage runs through.

A stage body turns its inputs into two tables, `kept` and `rejected`, and writes the media
the kept rows point to. `run_stage` does everything else, the same way for every stage:

1. builds the output in a hidden sibling directory (`.<out>.partial-<pid>-<id>`), so a stage
   killed at any point leaves nothing at the output path that a re-run or a later stage
   could mistake for a result;
2. checks the accounting `input == kept + rejected` and that every rejection has a known
   reason code; for a stage that splits inputs (filter: one video, many clips) every input
   must be the source of a kept row or of a rejected one;
3. validates the manifest with the stage's Great Expectations suite (a failure is a
   GateError: the output is not committed and the pipeline stops);
4. writes manifest.parquet and rejected.parquet, versions the directory with DVC and pushes
   it to the remote, records an MLflow run with the resolved config, counts and dataset;
5. writes stage.json last and renames the finished directory into place in one step.

What it records never holds a credential: URIs in the tables (`source_uri`, `detail`, ...),
in stage.json (the config's `tracking.uri`, the sources) and in MLflow are redacted
(vidops.tracking.redact), the same way everywhere, so records still join on `source_uri`.

An output directory without a complete stage.json is never trusted (`load_output` refuses it).
"""

from __future__ import annotations

import hashlib
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
from tqdm import tqdm

from vidops import faults
from vidops.config import Config
from vidops.data.manifest import REJECTED_COLUMNS, Reason, read_table, write_table
from vidops.media.files import pid_alive, write_json_atomic
from vidops.tracking import dvc as dvc_tracking
from vidops.tracking import mlflow_runs
from vidops.tracking.redact import redact_frame, redact_obj
from vidops.tracking.workdir import Workdir, code_version

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
REJECTED = "rejected.parquet"
STAGE_JSON = "stage.json"
VALIDATION_JSON = "validation.json"
DATA_DOCS = "data_docs"
STATUS_COMPLETE = "complete"


class StageError(RuntimeError):
    """A stage could not produce a trustworthy output."""


class AccountingError(StageError):
    """Inputs went missing or were counted twice: input != kept + rejected."""


class GateError(StageError):
    """The data failed its quality gate (Great Expectations suite): exit code 1."""


class ItemProgress(tqdm):
    """A stage's progress over its items (videos, clips, batches). Each update also passes
    the stage's `<stage>.item` fault point (vidops/faults.py), so every stage can be killed
    between items the same way, by one mechanism."""

    def __init__(self, stage: str, total: int, unit: str, quiet: bool = False) -> None:
        super().__init__(total=total, desc=stage, unit=unit, disable=quiet)
        self.fault_point = f"{stage}.item"

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        faults.point(self.fault_point)
        return shown


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
    # The finished stage outputs this stage read: dataset versions for lineage and MLflow.
    inputs: list[tuple[pd.DataFrame, dict[str, Any]]] = field(default_factory=list)

    def read_input(self, directory: Path) -> pd.DataFrame:
        """The manifest of a finished stage output, recorded as an input of this stage."""
        manifest, info = load_output(directory)
        self.inputs.append((manifest, info))
        return manifest

    def input_manifest(self) -> pd.DataFrame:
        if self.in_dir is None:
            raise StageError(f"stage {self.name} has no input directory")
        return self.read_input(self.in_dir)

    def progress(self, total: int, unit: str) -> ItemProgress:
        return ItemProgress(self.name, total, unit, self.quiet)

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
    # For stages that split inputs: the input ids, and the column of kept and rejected rows
    # that names the input each row came from. Unset: one row out per input in.
    input_ids: list[str] | None = None
    unit: str | None = None


StageBody = Callable[[StageContext], StageOutcome]


def digest_of(value: Any) -> str:
    """A stable digest of JSON-able data: what a stage records as its input's identity."""
    text = json.dumps(value, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def _remove_stale_partials(out_dir: Path) -> None:
    """Partial outputs of stages that died (their process is gone) are deleted."""
    for leftover in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        try:
            pid = int(leftover.name.rsplit(".", 1)[-1].split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or not pid_alive(pid):
            shutil.rmtree(leftover, ignore_errors=True)


def _check_accounting(name: str, outcome: StageOutcome) -> dict[str, Any]:
    """Every input accounted for exactly once; returns the counts for stage.json."""
    kept, rejected = len(outcome.kept), len(outcome.rejected)
    counts: dict[str, Any] = {"input": outcome.input_count, "kept": kept, "rejected": rejected}
    if outcome.unit is None:
        if outcome.input_count != kept + rejected:
            raise AccountingError(
                f"stage {name}: {outcome.input_count} inputs but {kept} kept + {rejected} "
                "rejected")
    else:
        inputs = set(outcome.input_ids or [])
        if len(inputs) != outcome.input_count:
            raise AccountingError(f"stage {name}: input ids are not unique")
        with_kept = set(outcome.kept[outcome.unit].astype(str))
        with_rejected = set(outcome.rejected["source_sha256"].astype(str)
                            if outcome.unit == "source_sha256"
                            else outcome.rejected["id"].astype(str))
        unknown = (with_kept | with_rejected) - inputs
        lost = inputs - with_kept - with_rejected
        if unknown or lost:
            raise AccountingError(f"stage {name}: {len(lost)} inputs unaccounted for "
                                  f"{sorted(lost)[:3]}, {len(unknown)} rows from unknown inputs")
        clip_ids = set(outcome.rejected["id"].astype(str))
        if "clip_id" in outcome.kept and clip_ids & set(outcome.kept["clip_id"].astype(str)):
            raise AccountingError(f"stage {name}: rows both kept and rejected")
        # input == inputs_kept + inputs_rejected: an input is kept if any of its rows is.
        counts.update(inputs_kept=len(with_kept), inputs_rejected=len(inputs - with_kept))
    missing = set(REJECTED_COLUMNS) - set(outcome.rejected.columns)
    if missing:
        raise StageError(f"stage {name}: rejected table lacks columns {sorted(missing)}")
    known = {reason.value for reason in Reason}
    unknown_reasons = set(outcome.rejected["reason"].astype(str)) - known
    if unknown_reasons:
        raise StageError(f"stage {name}: unknown reason codes {sorted(unknown_reasons)}")
    counts["by_reason"] = dict(sorted(Counter(outcome.rejected["reason"].astype(str)).items()))
    return counts


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


def _validation_key(suite: str, cfg: Config, counts: dict[str, Any], manifest_file: Path
                    ) -> str:
    """What a validation result depends on: the manifest's bytes, the suite's code and its
    settings, the counts it checks and the GX release. Computed without importing GX."""
    from importlib import metadata

    from vidops.quality import suites

    return digest_of({
        "suite": suite,
        "manifest": hashlib.sha256(manifest_file.read_bytes()).hexdigest(),
        "suites_code": hashlib.sha256(Path(suites.__file__).read_bytes()).hexdigest(),
        "config": cfg.to_dict(), "counts": counts,
        "great_expectations": metadata.version("great_expectations"),
    }).removeprefix("sha256:")


def _validate(suite: str, manifest: pd.DataFrame, cfg: Config, gx_dir: Path,
              counts: dict[str, Any], ctx: StageContext) -> dict[str, Any] | None:
    """Run the suite, if the stage has one; a failure is logged to MLflow, then raised.

    A passed validation is kept in `<workdir>/cache/validation/<key>`: the same manifest
    bytes under the same suite, settings and GX release pass again without re-running GX
    (whose import alone costs seconds), and the earlier results and Data Docs are reused.
    """
    from vidops.quality.suites import SUITE_STAGES

    if suite not in SUITE_STAGES:
        return None
    gx_dir.mkdir()
    with ctx.timed("validate"):
        key = _validation_key(suite, cfg, counts, ctx.out_dir / MANIFEST)
        cached = ctx.workdir.root / "cache" / "validation" / key
        if (cached / "summary.json").is_file():
            shutil.copytree(cached / "results", gx_dir, dirs_exist_ok=True)
            summary = json.loads((cached / "summary.json").read_text(encoding="utf-8"))
            mlflow.log_metric("validation_success", 1.0)
            return {**summary, "reused": key}
        from vidops.quality.validate import validate_manifest

        report = validate_manifest(suite, manifest, cfg, gx_dir, counts)
    summary = {"suite": suite, "success": report.success, "evaluated": report.evaluated,
               "successful": report.successful, "failed": report.failed,
               "results": VALIDATION_JSON, "data_docs": f"{DATA_DOCS}/index.html"}
    mlflow.log_metric("validation_success", float(report.success))
    if not report.success:
        for produced in gx_dir.iterdir():
            mlflow_runs.log_file(produced)
        message = (f"stage {ctx.name}: the {suite} data failed its Great Expectations suite: "
                   f"{'; '.join(report.failed)}")
        _record_gate_failure(ctx, message, summary)
        raise GateError(message)
    partial = cached.with_name(f".{key}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    shutil.copytree(gx_dir, partial / "results")
    (partial / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    try:
        partial.rename(cached)
    except OSError:  # another run stored the same result first
        shutil.rmtree(partial, ignore_errors=True)
    return summary


GATE_FAILURES = "gate-failures"


def _record_gate_failure(ctx: StageContext, message: str, summary: dict[str, Any]) -> None:
    run = mlflow.active_run()
    record_gate_failure(ctx.workdir, ctx.name, message, {"validation": summary},
                        run.data.tags.get("mlflow.parentRunId") if run else None,
                        run.info.run_id if run else None)


def record_gate_failure(workdir: Workdir, stage: str, message: str, details: dict[str, Any],
                        parent_run_id: str | None, mlflow_run_id: str | None = None) -> None:
    """Leave a note in the workdir, so whoever runs the pipeline (possibly in another process)
    can tell a refused gate (exit 1) from a crash: a data gate, or the registry's."""
    record = redact_obj({"stage": stage, "message": message, **details,
                         "mlflow_run_id": mlflow_run_id, "parent_run_id": parent_run_id,
                         "at": datetime.now(timezone.utc).isoformat()})
    folder = workdir.root / GATE_FAILURES
    folder.mkdir(exist_ok=True)
    name = f"{stage}-{mlflow_run_id or uuid.uuid4().hex[:12]}.json"
    write_json_atomic(folder / name, record)


def gate_failures(workdir: Workdir, parent_run_id: str) -> list[dict[str, Any]]:
    """The gate failures recorded under one pipeline run."""
    folder = workdir.root / GATE_FAILURES
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if (
        folder.is_dir()) else []
    return [r for r in records if r.get("parent_run_id") == parent_run_id]


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
    suite: str | None = None,
    dataset_name: str | None = None,
) -> dict[str, Any]:
    """Run one stage under the contract and return its stage.json content.

    `suite` names the Great Expectations suite the manifest must pass (default: the stage's
    own, when one exists); `dataset_name` is the DVC dataset (default: the output directory's
    name, which the workdir keeps unique per stage, shard and corpus)."""
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    # Validation results carry timestamps, so they stay out of the hashed dataset: they are
    # built beside it and moved in after DVC has hashed the data.
    gx_dir = out_dir.with_name(f".{out_dir.name}.gx-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    started_at = datetime.now(timezone.utc)
    clock = time.perf_counter()
    experiment = experiment or cfg.tracking.experiments.curation
    try:
        with mlflow_runs.stage_run(cfg, workdir, name, experiment, parent_run_id) as run:
            ctx = StageContext(name, cfg, workdir, tmp, Path(in_dir).resolve() if in_dir else None,
                               quiet)
            with ctx.timed("body"):
                outcome = body(ctx)
            # Before anything is written, validated or hashed: the recorded form of a URI.
            outcome.kept = redact_frame(outcome.kept)
            outcome.rejected = redact_frame(outcome.rejected)
            counts = _check_accounting(name, outcome)
            by_reason = counts["by_reason"]

            with ctx.timed("write"):
                write_table(outcome.kept, tmp / MANIFEST)
                write_table(outcome.rejected[REJECTED_COLUMNS], tmp / REJECTED)
                faults.point(f"{name}.written")
            validation = _validate(suite or name, outcome.kept, cfg, gx_dir, counts, ctx)
            with ctx.timed("dvc"):
                version = dvc_tracking.version_directory(workdir, tmp, dataset_name or out_dir.name,
                                                         cfg.dvc.remote)
            faults.point(f"{name}.versioned")
            if validation is not None:
                for produced in gx_dir.iterdir():
                    produced.rename(tmp / produced.name)
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
                          "digest": outcome.input_digest,
                          "datasets": [{"stage": info["stage"], "dir": info["output"]["dir"],
                                        "dvc_md5": info["dvc"]["md5"],
                                        "mlflow_run_id": info["mlflow"]["run_id"]}
                                       for _, info in ctx.inputs]},
                "output": {"dir": str(out_dir), "manifest": MANIFEST, "rejected": REJECTED},
                "counts": counts,
                "validation": validation,
                "dvc": version.to_dict(),
                "mlflow": {"tracking_uri": mlflow_runs.redact(mlflow.get_tracking_uri()),
                           "experiment": experiment,
                           "experiment_id": run.info.experiment_id,
                           "run_id": run.info.run_id,
                           "parent_run_id": parent_run_id or None},
                **outcome.extra,
            }
            info = redact_obj(info)
            (tmp / STAGE_JSON).write_text(json.dumps(info, indent=2, default=str) + "\n",
                                          encoding="utf-8")

            mlflow.log_metrics({"input": counts["input"], "kept": counts["kept"],
                                "rejected": counts["rejected"], "duration_s": info["duration_s"],
                                **{f"rejected_{k}": v for k, v in by_reason.items()}})
            mlflow.set_tags({"vidops.code_version": info["code_version"],
                             "vidops.dvc_md5": version.md5, "vidops.output_dir": str(out_dir)})
            mlflow_runs.log_dataset(outcome.kept, name=name, digest=version.md5,
                                    source=version.object_uri, context="output")
            for manifest, consumed in ctx.inputs:
                mlflow_runs.log_dataset(
                    manifest, name=Path(consumed["output"]["dir"]).name,
                    digest=consumed["dvc"]["md5"],
                    source=dvc_tracking.DatasetVersion(**consumed["dvc"]).object_uri,
                    context="input")
            for artifact in (STAGE_JSON, MANIFEST, REJECTED, VALIDATION_JSON, DATA_DOCS):
                if (tmp / artifact).exists():
                    mlflow_runs.log_file(tmp / artifact)
            _commit(tmp, out_dir)
            faults.point(f"{name}.committed")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(gx_dir, ignore_errors=True)
    log.info("%s: %d in, %d kept, %d rejected -> %s", name, counts["input"], counts["kept"],
             counts["rejected"], out_dir)
    return info
