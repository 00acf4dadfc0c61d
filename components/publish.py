"""What every stage component hands back to KFP, the same way for all of them."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any

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
