"""What every stage component hands back to KFP, the same way for all of them."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any


class StaleInput(RuntimeError):
    """A task's input folder no longer holds the data version the pipeline handed it."""


def check_input(in_dir: str | Path, input_md5: str) -> None:
    """Fail when `in_dir` no longer holds DVC version `input_md5`.

    On a cluster, KFP's cache may serve an upstream task from an earlier run: it hands on the
    folder that run wrote, which a later run may since have overwritten with other data. The
    version in the folder's stage.json tells; reading stale data silently would not.
    """
    if input_md5:
        check_inputs([str(in_dir)], [input_md5])


def check_inputs(in_dirs: list[str], input_md5s: list[str]) -> None:
    """`check_input` for a fan-in: the folders hold exactly the versions handed over."""
    if not input_md5s:
        return
    from vidops.stage import load_output

    found = sorted(load_output(Path(d))[1]["dvc"]["md5"] for d in in_dirs)
    if found != sorted(input_md5s):
        raise StaleInput(
            f"{', '.join(map(str, in_dirs))} hold(s) data version(s) {found}, not "
            f"{sorted(input_md5s)} that this task was given (a cached task's output was "
            "overwritten by a later run); rerun with caching off (vidops submit --no-cache)")


StageOutputs = namedtuple("StageOutputs", "out_dir dvc_md5 mlflow_run_id kept rejected")
ModelOutputs = namedtuple("ModelOutputs", "model_dir mlflow_run_id final_loss")


def publish_stage(info: dict[str, Any], manifest: Any) -> StageOutputs:
    """Expose a finished stage (its stage.json content) as KFP outputs.

    The media stay on the shared workdir (a PVC on a cluster); the KFP artifact carries the
    manifest and, as metadata, the DVC version and counts, so the KFP UI shows lineage
    without copying videos through the pipeline root.
    """
    out_dir = Path(info["output"]["dir"])
    Path(manifest.path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out_dir / info["output"]["manifest"], manifest.path)
    manifest.metadata.update({
        "stage": info["stage"], "dvc_md5": info["dvc"]["md5"], "dvc_remote": info["dvc"]["remote"],
        "mlflow_run_id": info["mlflow"]["run_id"], "out_dir": str(out_dir),
        **{f"count_{k}": v for k, v in info["counts"].items() if k != "by_reason"},
    })
    counts = info["counts"]
    return StageOutputs(str(out_dir), info["dvc"]["md5"], info["mlflow"]["run_id"],
                        int(counts["kept"]), int(counts["rejected"]))


def publish_model(summary: dict[str, Any], model: Any, **metadata: Any) -> ModelOutputs:
    """Expose a finished training run (its training.json content) as KFP outputs.

    The weights stay on the shared workdir; the KFP artifact is the model card, with the
    model folder, MLflow run and `metadata` as artifact metadata.
    """
    Path(model.path).parent.mkdir(parents=True, exist_ok=True)
    card = Path(summary["model_dir"]) / "vidops_model.json"
    Path(model.path).write_text(card.read_text())
    model.metadata.update({"model_dir": summary["model_dir"],
                           "mlflow_run_id": summary["mlflow_run_id"],
                           "final_loss": summary["final_loss"], "steps": summary["steps"],
                           **metadata})
    return ModelOutputs(summary["model_dir"], summary["mlflow_run_id"],
                        float(summary["final_loss"]))
