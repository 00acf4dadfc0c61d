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
    from pathlib import Path

    from vidops.components.publish import publish_model
    from vidops.config import config_from_json
    from vidops.stages.finetune import finetune as run_finetune
    from vidops.tracking.workdir import Workdir

    work = Workdir.at(workdir)
    # One process here; sft makes itself a DeepSpeed group of one. Several processes or
    # nodes are a launcher's job (torchrun in the pod, or a PyTorchJob).
    summary = run_finetune(Path(data_dir), base_model, work.models / "finetune",
                           cfg=config_from_json(config_json), workdir=work,
                           parent_run_id=parent_run_id or None, quiet=quiet)
    print(json.dumps({"model_dir": summary["model_dir"]}))
    return publish_model(summary, model, base_model=base_model)
