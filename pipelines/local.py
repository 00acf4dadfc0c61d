"""Run a pipeline on this machine through kfp.local, the embedded default.

`kfp.local.SubprocessRunner` executes each component in a subprocess of this Python
environment, exactly the component code a cluster runs in the project image. The driver opens
the MLflow parent run that the stage runs nest under, and summarises what the stages recorded
in their stage.json files.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import kfp.local

from vidops.config import Config, ConfigError
from vidops.data.samples import write_samples
from vidops.stage import StageError, gate_failures, load_output
from vidops.tracking import mlflow_runs
from vidops.tracking.redact import redact_obj, refuse_inline_credentials
from vidops.tracking.workdir import Workdir

log = logging.getLogger(__name__)

class PipelineFailed(RuntimeError):
    """A task of the pipeline failed; `gate` is set when it was a data-quality gate."""

    def __init__(self, message: str, gate: bool) -> None:
        super().__init__(message)
        self.gate = gate


def _stage_outputs(workdir: Workdir, parent_run_id: str) -> list[dict[str, Any]]:
    """The stage outputs this run produced: those whose MLflow run nests under its parent."""
    found = []
    for stage_file in sorted((workdir.root / "data").glob("*/stage.json")):
        try:
            _, info = load_output(stage_file.parent)
        except StageError:
            continue
        if info["mlflow"].get("parent_run_id") == parent_run_id:
            found.append(info)
    return sorted(found, key=lambda info: info["started_at"])


def _models_trained(workdir: Workdir, parent_run_id: str) -> list[dict[str, Any]]:
    """The model folders this run trained (pretrain, then fine-tune), from their
    training.json files."""
    from vidops.stages.training import TRAINING_JSON

    found = []
    for summary_file in sorted((workdir.models).glob(f"*/{TRAINING_JSON}")):
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        if summary.get("parent_run_id") == parent_run_id:
            found.append({k: summary.get(k) for k in (
                "stage", "model_dir", "mlflow_run_id", "steps", "final_loss", "seconds",
                "data_dir", "started_at")})
    return sorted(found, key=lambda model: model["started_at"] or "")


def _judged(workdir: Workdir, parent_run_id: str, cfg: Config) -> list[dict[str, Any]]:
    """The evaluations this run made, with what the registry did with each model: its
    version and (current) aliases, and the gates that failed."""
    from mlflow.tracking import MlflowClient

    from vidops.stages.evaluate import METRICS_JSON, REPORT_HTML
    from vidops.tracking.registry import REGISTRATION_JSON, failed_gates

    found = []
    for metrics_file in sorted(workdir.evaluations.glob(f"*/{METRICS_JSON}")):
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        if metrics.get("parent_run_id") != parent_run_id:
            continue
        entry = {"model_dir": metrics["model"]["path"], "eval_dir": str(metrics_file.parent),
                 "report": str(metrics_file.parent / REPORT_HTML),
                 "headline": metrics["headline"], "registered": None}
        record_file = metrics_file.parent / REGISTRATION_JSON
        if record_file.is_file():
            record = json.loads(record_file.read_text(encoding="utf-8"))
            if record.get("parent_run_id") == parent_run_id:
                mlflow_runs.configure(cfg, workdir)
                aliases = MlflowClient().get_model_version(record["name"],
                                                           record["version"]).aliases
                entry["registered"] = {"name": record["name"], "version": record["version"],
                                       "aliases": sorted(aliases), "passed": record["passed"],
                                       "promoted": bool(record.get("promoted")),
                                       "failed_gates": failed_gates(record)}
        found.append(entry)
    return sorted(found, key=lambda e: e["registered"]["version"] if e["registered"] else "")


def ensure_samples(cfg: Config, workdir: Workdir, quiet: bool = False,
                   kinds: list[str] | None = None) -> list[str]:
    """The sample corpora `kinds` (default cfg.samples.kinds), generated once per (kind,
    count, seed)."""
    sources = []
    for kind in cfg.samples.kinds if kinds is None else kinds:
        count = None if kind == "defects" else getattr(
            cfg.samples.counts, kind.replace("-", "_"))
        target = workdir.samples_dir(kind)
        marker = target.with_name(f"{kind}.json")
        wanted = {"kind": kind, "count": count, "seed": cfg.seed}
        if not (target.is_dir() and marker.is_file()
                and json.loads(marker.read_text()) == wanted):
            if not quiet:
                log.info("writing %s samples to %s", kind, target)
            partial = target.with_name(f".{kind}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            marker.unlink(missing_ok=True)
            write_samples(partial, kind, count=count, seed=cfg.seed)
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
            marker.write_text(json.dumps(wanted))
        sources.append(str(target))
    return sources


RUN_LOCK = ".run.lock"


@contextmanager
def exclusive_run(workdir: Workdir) -> Iterator[None]:
    """One `vidops run` at a time per workdir: a second one waits for the first, saying whose
    run it waits for. Two runs interleaving their stages in one workdir would overwrite each
    other's outputs. The kernel drops the lock when its holder dies (even by SIGKILL), so a
    killed run never leaves the workdir locked."""
    path = workdir.root / RUN_LOCK
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that did not say"
            print(f"vidops: workdir {workdir.root} is in use by another vidops run ({holder}); "
                  "waiting for it to finish", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_local(
    name: str,
    cfg: Config,
    workdir: Workdir,
    sources: list[str] | None = None,
    quiet: bool = False,
    curated_dir: Path | None = None,
    finetune_sources: list[str] | None = None,
) -> dict[str, Any]:
    """Run pipeline `name` locally; returns the run summary (also in run-summary.json).

    Pipelines that start from sources get `sources` (default: the sample corpus); the
    training pipeline gets `curated_dir` (default: the workdir's curated dataset). The
    lifecycle fine-tunes on `finetune_sources` (default, when `sources` are the samples too:
    the samples.finetune_kinds corpus)."""
    with exclusive_run(workdir):
        return _run_local(name, cfg, workdir, sources, quiet, curated_dir, finetune_sources)


def _run_local(name: str, cfg: Config, workdir: Workdir, sources: list[str] | None,
               quiet: bool, curated_dir: Path | None, finetune_sources: list[str] | None
               ) -> dict[str, Any]:
    from vidops.pipelines.registry import EXPERIMENT, INPUT_PARAMETER, PIPELINES

    finetune_sources = list(finetune_sources or [])
    # The configuration and sources become the tasks' parameters (kept by kfp.local under
    # the pipeline root), as on a cluster: credentials come from the environment only.
    refuse_inline_credentials(cfg.to_dict(), [*(sources or []), *finetune_sources],
                              where=f"the {name} pipeline")
    if INPUT_PARAMETER[name] == "sources":
        if name == "lifecycle" and cfg.pipeline.finetune and not finetune_sources:
            if sources:
                raise ConfigError("the lifecycle fine-tunes the model it pretrains: give "
                                 "--finetune-source URI..., or --set pipeline.finetune=false")
            finetune_sources = ensure_samples(cfg, workdir, quiet, cfg.samples.finetune_kinds)
        sources = list(sources) if sources else ensure_samples(cfg, workdir, quiet)
        data_input: dict[str, Any] = {"sources": sources}
        if name == "lifecycle" and cfg.pipeline.finetune:
            data_input["finetune_sources"] = finetune_sources
    else:
        curated = Path(curated_dir or workdir.stage_dir("curated")).resolve()
        # A missing or unfinished dataset fails here, not in a task.
        _, curated_info = load_output(curated)
        sources = []
        data_input = {"curated_dir": str(curated), "curated_md5": curated_info["dvc"]["md5"]}
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    experiment = getattr(cfg.tracking.experiments, EXPERIMENT[name])
    parent_run_id = mlflow_runs.start_parent_run(
        cfg, workdir, experiment, run_name=f"{name}-{started:%Y%m%d-%H%M%S}")
    kfp.local.init(
        runner=kfp.local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workdir.root / cfg.pipeline.local_root),
        raise_on_error=True,
    )
    status = "FAILED"
    failure: Exception | None = None
    try:
        # kfp.local warns that the components name a container image while running them in
        # this environment, and that their cluster settings do nothing here: that is the
        # point of the embedded default.
        warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*have no effect in the current local "
                                "runner.*")
        PIPELINES[name](cfg)(**data_input, workdir=str(workdir.root),
                             config_json=cfg.to_json(), parent_run_id=parent_run_id, quiet=quiet)
        status = "FINISHED"
    except RuntimeError as exc:  # kfp.local: a task ended with status FAILURE
        failure = exc
    finally:
        mlflow_runs.end_run(parent_run_id, status)

    gates = gate_failures(workdir, parent_run_id)
    models = _models_trained(workdir, parent_run_id)
    judged = _judged(workdir, parent_run_id, cfg)
    stages = [{
        "stage": info["stage"], "out_dir": info["output"]["dir"], "counts": info["counts"],
        "dvc_md5": info["dvc"]["md5"], "mlflow_run_id": info["mlflow"]["run_id"],
        "validation": (info.get("validation") or {}).get("success"),
        "duration_s": info["duration_s"],
    } for info in _stage_outputs(workdir, parent_run_id)]
    summary = {
        "pipeline": name,
        "status": "succeeded" if failure is None else "failed",
        "error": None if failure is None else str(failure),
        "gate_failures": gates,
        "started_at": started.isoformat(),
        "duration_s": round(time.perf_counter() - clock, 3),
        "workdir": str(workdir.root),
        "sources": sources,
        "finetune_sources": finetune_sources,
        "mlflow": {"tracking_uri": mlflow_runs.redact(mlflow_runs.tracking_uri(cfg, workdir)),
                   "parent_run_id": parent_run_id},
        "stages": stages,
        "models": models,
        # The model the run ends with (fine-tuned when the pipeline fine-tunes).
        "model": models[-1] if models else None,
        "evaluations": judged,
    }
    summary = redact_obj(summary)  # the failure message may name a URI
    tmp = workdir.run_summary.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    tmp.replace(workdir.run_summary)
    if failure is not None:
        reason = "; ".join(g["message"] for g in gates) if gates else str(failure)
        raise PipelineFailed(f"{name} pipeline failed: {reason}", gate=bool(gates)) from failure
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    rows = [("stage", "output", "input", "kept", "rejected", "reasons", "valid", "dvc md5",
             "seconds")]
    for stage in summary["stages"]:
        counts = stage["counts"]
        reasons = ", ".join(f"{k}={v}" for k, v in counts["by_reason"].items()) or "-"
        valid = {True: "yes", False: "NO", None: "-"}[stage["validation"]]
        rows.append((stage["stage"], Path(stage["out_dir"]).name, str(counts["input"]),
                     str(counts["kept"]), str(counts["rejected"]), reasons, valid,
                     stage["dvc_md5"][:12], f"{stage['duration_s']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"\n{summary['pipeline']} pipeline {summary['status']} in "
                 f"{summary['duration_s']:.1f}s; workdir {summary['workdir']}")
    lines.append(f"MLflow parent run {summary['mlflow']['parent_run_id']} at "
                 f"{summary['mlflow']['tracking_uri']}")
    for model in summary.get("models") or []:
        lines.append(f"{model['stage']} model: {model['model_dir']} ({model['steps']} steps, "
                     f"final loss {model['final_loss']:.4f}, MLflow run "
                     f"{model['mlflow_run_id']})")
    champion = None
    for judged in summary.get("evaluations") or []:
        lines.append(f"\nevaluated {judged['model_dir']}: report {judged['report']}")
        lines.append("  " + ", ".join(f"{k} {v:.3g}" for k, v in judged["headline"].items()))
        reg = judged["registered"]
        if reg:
            aliases = ", ".join(reg["aliases"]) or "no alias"
            verdict = ("every gate passed" if reg["passed"]
                       else "refused promotion: " + "; ".join(reg["failed_gates"]))
            if reg["promoted"] and "champion" not in reg["aliases"]:
                verdict += "; promoted to champion, since superseded"
            lines.append(f"  registered {reg['name']} v{reg['version']} ({aliases}); {verdict}")
            if "champion" in reg["aliases"]:
                champion = reg["name"]
    model = summary.get("model")
    if champion:
        lines.append(f"try: vidops generate --model models:/{champion}@champion "
                     "--prompt 'a red circle moving right' --out sample.mp4")
    elif model:
        prompt = ("a purple circle moving right" if model["stage"] == "finetune"
                  else "a red circle moving right")
        lines.append(f"try: vidops generate --model {model['model_dir']} "
                     f"--prompt '{prompt}' --out sample.mp4")
    return "\n".join(lines)
