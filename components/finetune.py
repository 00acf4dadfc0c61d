"""The fine-tune component: LoRA or full fine-tuning of a trained model on encoded data."""

from typing import NamedTuple

from kfp import dsl

from vidops.components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def finetune(
    data_dir: str,
    base_model: str,
    workdir: str,
    config_json: str,
    model: dsl.Output[dsl.Model],
    parent_run_id: str = "",
    quiet: bool = True,
) -> NamedTuple("FinetuneOutputs", model_dir=str, mlflow_run_id=str, final_loss=float):
    import json
    from collections import namedtuple
    from pathlib import Path

    from vidops.config import config_from_json
    from vidops.stages.finetune import finetune as run_finetune
    from vidops.tracking.workdir import Workdir

    work = Workdir.at(workdir)
    # One process here; sft makes itself a DeepSpeed group of one. Several processes or
    # nodes are a launcher's job (torchrun in the pod, or a PyTorchJob).
    summary = run_finetune(Path(data_dir), base_model, work.root / "models" / "finetune",
                           cfg=config_from_json(config_json), workdir=work,
                           parent_run_id=parent_run_id or None, quiet=quiet)
    Path(model.path).parent.mkdir(parents=True, exist_ok=True)
    card = Path(summary["model_dir"]) / "vidops_model.json"
    Path(model.path).write_text(card.read_text())
    model.metadata.update({"model_dir": summary["model_dir"],
                           "mlflow_run_id": summary["mlflow_run_id"],
                           "final_loss": summary["final_loss"], "steps": summary["steps"],
                           "base_model": base_model})
    outputs = namedtuple("FinetuneOutputs", "model_dir mlflow_run_id final_loss")
    print(json.dumps({"model_dir": summary["model_dir"]}))
    return outputs(summary["model_dir"], summary["mlflow_run_id"], float(summary["final_loss"]))
