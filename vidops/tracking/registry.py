"""The model registry: candidates registered as MLflow pyfunc models, promoted only by gates.

`register` logs a candidate (model folder + its evaluation) as a pyfunc in a `register` run,
registers it as a version of `tracking.registered_model` with lineage tags, and checks the
gates:

    data          every dataset it learned from passed its Great Expectations suite
    license       no source it learned from has a license on the deny-list (or none at all,
                  when one is required)
    thresholds    each `registry.thresholds` headline metric at least (at most) its bound
    regression    no `registry.max_regression` metric worse than the champion's beyond its bound

A candidate whose data failed, or whose sources' licenses are refused, is refused before
anything is registered. Every other candidate
becomes a version with alias `challenger`; it takes `champion` only when every gate passed.
The champion alias moves by compare-and-set: a promotion names the champion it was compared
with and is refused if another promotion moved it meanwhile.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vidops import faults
from vidops.config import Config, SamplingConfig
from vidops.media.files import write_json_atomic
from vidops.stage import GateError, StageError, record_gate_failure
from vidops.tracking import mlflow_runs
from vidops.tracking.redact import redact_obj
from vidops.tracking.workdir import Workdir, code_version

CHAMPION, CHALLENGER = "champion", "challenger"
EVALUATION = "evaluation"  # the register run's artifact folder holding the evaluation
METRICS_JSON = "metrics.json"
_SKIP = ("checkpoints", "samples")  # training leftovers that are not part of a model


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    detail: str


def champion_version(client: MlflowClient, name: str) -> Any:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no such model, or no champion yet
        return None


def version_evaluation(version: Any) -> dict[str, Any]:
    """The evaluation a registered version was judged on (its register run's artifact)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=version.run_id, artifact_path=f"{EVALUATION}/{METRICS_JSON}", dst_path=tmp)
        return json.loads(Path(path).read_text(encoding="utf-8"))


def champion_evaluation(cfg: Config, workdir: Workdir) -> tuple[str, dict[str, Any]] | None:
    """(label, metrics.json) of the current champion, or None when there is none."""
    mlflow_runs.configure(cfg, workdir)
    name = cfg.tracking.registered_model
    version = champion_version(MlflowClient(), name)
    if version is None:
        return None
    return f"champion ({name} v{version.version})", version_evaluation(version)


# ---------------------------------------------------------------------------------------------
# Gates


def _datasets(card: dict[str, Any], base_card: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every dataset version a model learned from: its own, and its base's for a fine-tune."""
    found = [{**d, "name": Path(d["dir"]).name}
             for d in (card.get("data") or {}).get("datasets", [])]
    if base_card is not None:
        found += [{**d, "name": f"base.{Path(d['dir']).name}"}
                  for d in (base_card.get("data") or {}).get("datasets", [])]
    return found


def data_gate(datasets: list[dict[str, Any]], require_valid: bool) -> Gate:
    failed = [d for d in datasets if d.get("validation") is False]
    if failed:
        return Gate("data", False, "failed Great Expectations validation: " + ", ".join(
            f"{d['name']} ({d['dvc_md5']})" for d in failed))
    validated = [d for d in datasets if d.get("validation") is True]
    if require_valid and not validated:
        return Gate("data", False, "no validated training data recorded (a model trained "
                    "outside vidops, or on unvalidated data; registry.require_valid_data)")
    return Gate("data", True, f"{len(validated)} validated dataset version(s)")


def license_gate(cards: list[dict[str, Any]], deny: list[str], require: bool) -> Gate:
    """The licenses of the sources a model (and its base) learned from, as its cards record
    them, against the deny-list."""
    seen = {lic for c in cards for lic in (c.get("data") or {}).get("licenses", [])}
    unlicensed = sum(int((c.get("data") or {}).get("sources_without_license", 0))
                     for c in cards)
    denied = sorted(seen & set(deny))
    if denied:
        return Gate("license", False, f"learned from sources licensed {', '.join(denied)} "
                    "(registry.license_deny)")
    if require and unlicensed:
        return Gate("license", False, f"learned from {unlicensed} source(s) without a license "
                    "(registry.require_license)")
    return Gate("license", True, f"licenses {', '.join(sorted(seen)) or 'none recorded'}; "
                f"{unlicensed} source(s) without one")


def _known(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def metric_gates(headline: dict[str, float], info: dict[str, dict[str, Any]],
                 thresholds: dict[str, float | None], max_regression: dict[str, float | None],
                 champion: dict[str, float] | None) -> list[Gate]:
    """Thresholds on the candidate's headline metrics, and no regression against the champion
    (`champion` None: there is none, nothing to regress from). A None bound is no gate."""
    gates = []
    for key, bound in thresholds.items():
        if bound is None:
            continue
        value = headline.get(key)
        higher = info.get(key, {}).get("higher_is_better", True)
        if not _known(value):
            gates.append(Gate(f"threshold:{key}", False, "not measured"))
            continue
        ok = value >= bound if higher else value <= bound
        gates.append(Gate(f"threshold:{key}", ok,
                          f"{value:.4g} {'>=' if higher else '<='} {bound:g} required"))
    if champion is None:
        return gates
    for key, tolerance in max_regression.items():
        value, best = headline.get(key), champion.get(key)
        if tolerance is None or not (_known(value) and _known(best)):
            continue  # measured by one of them only: nothing to compare
        higher = info.get(key, {}).get("higher_is_better", True)
        worse_by = (best - value) if higher else (value - best)
        gates.append(Gate(f"regression:{key}", worse_by <= tolerance,
                          f"{value:.4g} against the champion's {best:.4g} (may be worse by "
                          f"{tolerance:g})"))
    return gates


# ---------------------------------------------------------------------------------------------
# Registration


def _stage_folder(src: Path, dst: Path) -> Path:
    """The model folder without training leftovers, hard-linked (no bytes copied)."""
    from vidops.media.files import link_or_copy

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*_SKIP),
                    copy_function=lambda s, d: link_or_copy(Path(s), Path(d)))
    return dst


def _lineage_tags(card: dict[str, Any], datasets: list[dict[str, Any]], data: Gate,
                  parent_run_id: str | None) -> dict[str, str]:
    tags = {f"vidops.dvc_md5.{d['name']}": d["dvc_md5"] for d in datasets}
    tags |= {f"vidops.manifest_sha256.{d['name']}": d.get("manifest_sha256") or "unknown"
             for d in datasets}
    tags |= {
        "vidops.datasets": json.dumps([{k: d.get(k) for k in (
            "name", "stage", "dvc_md5", "manifest_sha256", "validation")} for d in datasets]),
        "vidops.kind": str(card.get("kind")),
        "vidops.training_run_id": str(card.get("mlflow_run_id")),
        "vidops.pipeline_run_id": str(parent_run_id or ""),
        "vidops.code_version": code_version(),
        "vidops.model_code_version": str(card.get("code_version")),
        "vidops.gx_validation": "passed" if data.passed else "failed",
        "vidops.sources": str((card.get("data") or {}).get("sources", 0)),
    }
    return tags


def register(
    model_ref: str | Path,
    eval_dir: Path,
    *,
    cfg: Config,
    workdir: Workdir,
    promote: bool = True,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Register MODEL with its evaluation; returns what happened (version, aliases, gates,
    `passed`). A failed threshold or regression gate leaves it a challenger (passed False,
    the champion stays put); a failed data or license gate raises GateError before anything
    is registered."""
    from vidops.models import pyfunc
    from vidops.models.folder import base_folder, model_identity, read_card
    from vidops.models.imported import resolve_model_ref

    name = cfg.tracking.registered_model
    model_dir = resolve_model_ref(model_ref, cfg=cfg, workdir=workdir)
    metrics_file = Path(eval_dir) / METRICS_JSON
    if not metrics_file.is_file():
        raise StageError(f"{eval_dir} is not an evaluation (no {METRICS_JSON}): run vidops "
                         "evaluate --model MODEL --out DIR first")
    evaluation = json.loads(metrics_file.read_text(encoding="utf-8"))
    identity = model_identity(model_dir)
    if evaluation["model"]["digest"] != identity:
        raise StageError(f"{eval_dir} evaluated another model ({evaluation['model']['ref']}, "
                         f"{evaluation['model']['digest']}), not {model_ref} ({identity})")
    card = read_card(model_dir)
    base_dir = base_folder(model_dir, workdir.downloads)
    base_card = read_card(base_dir) if base_dir else None
    datasets = _datasets(card, base_card)
    data = data_gate(datasets, cfg.registry.require_valid_data)
    licensed = license_gate([c for c in (card, base_card) if c], cfg.registry.license_deny,
                            cfg.registry.require_license)
    for gate in (data, licensed):
        if not gate.passed:
            message = (f"{model_ref} refused, nothing registered: gate {gate.name}: "
                       f"{gate.detail}")
            # Recorded like a data gate's refusal: `vidops run` then exits 1, not 2.
            record_gate_failure(workdir, "register", message, {"gate": asdict(gate)},
                                parent_run_id)
            raise GateError(message)

    mlflow_runs.configure(cfg, workdir)
    client = MlflowClient()
    champion = champion_version(client, name)
    champion_eval = version_evaluation(champion) if champion is not None else None
    same_model = champion_eval is not None and champion_eval["model"]["digest"] == identity
    compared = None if same_model or champion_eval is None else champion_eval["headline"]
    gates = [data, licensed, *metric_gates(
        evaluation["headline"], evaluation.get("metric_info", {}), cfg.registry.thresholds,
        cfg.registry.max_regression, compared)]
    passed = all(g.passed for g in gates)

    # The pyfunc's default params: how the evaluation behind its metrics sampled.
    sampled_as = SamplingConfig(**{key: evaluation["settings"][key]
                                   for key in SamplingConfig.model_fields})
    experiment_id = mlflow_runs.ensure_experiment(cfg.tracking.experiments.training, workdir)
    with mlflow.start_run(experiment_id=experiment_id, run_name="register",
                          parent_run_id=parent_run_id or None,
                          tags={"vidops.stage": "register"}, log_system_metrics=False) as run, \
            tempfile.TemporaryDirectory(dir=workdir.root) as tmp:
        artifacts = {"model": str(_stage_folder(model_dir, Path(tmp) / "model"))}
        if base_dir is not None:
            artifacts["base"] = str(_stage_folder(base_dir, Path(tmp) / "base"))
        info = mlflow.pyfunc.log_model(
            name="model", python_model=pyfunc.__file__, artifacts=artifacts,
            signature=pyfunc.signature(model_dir, sampled_as, cfg.generate.negative_prompt),
            input_example=pyfunc.input_example(cfg.train.sample_prompts[0]
                                               if cfg.train.sample_prompts else "a video"),
            pip_requirements=pyfunc.requirements())
        faults.point("register.logged")
        mlflow.log_artifact(str(metrics_file), artifact_path=EVALUATION)
        report = Path(eval_dir) / "report.html"
        if report.is_file():
            mlflow.log_artifact(str(report), artifact_path=EVALUATION)
        mlflow.log_metrics({k: v for k, v in evaluation["headline"].items() if _known(v)})
        mlflow.set_tags({"vidops.model_digest": identity, "vidops.gates_passed": str(passed)})
        tags = _lineage_tags(card, datasets, data, parent_run_id)
        tags |= {f"vidops.metric.{k}": f"{v:.6g}" for k, v in evaluation["headline"].items()
                 if _known(v)}
        tags |= {"vidops.model_digest": identity, "vidops.eval_run_id":
                 str(evaluation.get("mlflow_run_id")), "vidops.register_run_id": run.info.run_id,
                 "vidops.gates": json.dumps([asdict(g) for g in gates]),
                 "vidops.gates_passed": str(passed)}
        # The version is created with all its tags in one call (one transaction in the
        # store): a registration killed at any point leaves no version, or one that carries
        # its lineage and gates, never a bare one.
        version = str(mlflow.register_model(info.model_uri, name, tags=redact_obj(tags)).version)
        faults.point("register.created")
        client.set_registered_model_alias(name, CHALLENGER, version)

    result = {"name": name, "version": version, "model_uri": f"models:/{name}/{version}",
              "gates": [asdict(g) for g in gates], "passed": passed,
              "champion_before": champion.version if champion is not None else None,
              "headline": evaluation["headline"], "register_run_id": run.info.run_id}
    if passed and promote:
        result |= set_champion(cfg, workdir, version, result["champion_before"])
    result["aliases"] = sorted(client.get_model_version(name, version).aliases)
    return result


def set_champion(cfg: Config, workdir: Workdir, version: str, expected: str | None
                 ) -> dict[str, Any]:
    """Move `champion` to `version` if it still points where the gates compared (`expected`);
    a champion that moved meanwhile means the gates compared with the wrong model."""
    from vidops.media.files import exclusive_lock

    mlflow_runs.configure(cfg, workdir)
    client = MlflowClient()
    name = cfg.tracking.registered_model
    # Serialises promotions that share this workdir (the embedded default).
    with exclusive_lock(workdir.root / ".registry.lock"):
        current = champion_version(client, name)
        now = current.version if current is not None else None
        if now != expected:
            raise GateError(f"{name} v{version} not promoted: the champion moved from "
                            f"v{expected} to v{now} since its gates were checked; register "
                            "again")
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "vidops.promoted_from", str(expected))
    return {"promoted": True, "champion": version}


def failed_gates(result: dict[str, Any]) -> list[str]:
    return [f"{g['name']}: {g['detail']}" for g in result["gates"] if not g["passed"]]


# ---------------------------------------------------------------------------------------------
# The pipeline's two steps: register, then (if the gates passed) promote


REGISTRATION_JSON = "registration.json"


def record_registration(eval_dir: str | Path, result: dict[str, Any],
                        parent_run_id: str | None) -> Path:
    """What a registration did, beside the evaluation it used: promote and the run summary
    read it."""
    return write_json_atomic(Path(eval_dir) / REGISTRATION_JSON,
                             {**result, "parent_run_id": parent_run_id})


def promote_registered(eval_dir: str | Path, *, cfg: Config, workdir: Workdir) -> str:
    """Promote the version registered from `eval_dir` (its gates passed)."""
    path = Path(eval_dir) / REGISTRATION_JSON
    record = json.loads(path.read_text(encoding="utf-8"))
    if not record["passed"]:
        raise GateError(f"v{record['version']} failed its gates: " +
                        "; ".join(failed_gates(record)))
    record |= set_champion(cfg, workdir, record["version"], record["champion_before"])
    mlflow_runs.configure(cfg, workdir)
    record["aliases"] = sorted(MlflowClient().get_model_version(
        record["name"], record["version"]).aliases)
    write_json_atomic(path, record)
    return str(record["version"])
