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
    input_md5: str = "",
    base_run_id: str = "",
    parent_run_id: str = "",
    quiet: bool = True,
) -> NamedTuple("FinetuneOutputs", model_dir=str, mlflow_run_id=str, final_loss=float):
    """`input_md5`: the DVC version of `data_dir` (checked; it keys KFP's cache), as
    `base_run_id` (the base model's training run) does for the base model."""
    import json
    from pathlib import Path

    from vidops.components.publish import check_input, publish_model
    from vidops.config import config_from_json
    from vidops.stages.finetune import finetune as run_finetune
    from vidops.tracking.workdir import Workdir
    from vidops.train.launch import launch_training

    del base_run_id
    check_input(data_dir, input_md5)
    work = Workdir.at(workdir)
    cfg = config_from_json(config_json)
    out_dir = work.models / "finetune"
    # One GPU: this process (sft makes itself a DeepSpeed group of one); several: torchrun.
    summary = launch_training(
        "finetune", ["--workdir", str(work.root), "--data", data_dir, "--base", base_model,
                     "--out", str(out_dir), "--parent-run-id", parent_run_id, "--quiet"],
        out_dir, cfg,
        lambda: run_finetune(Path(data_dir), base_model, out_dir, cfg=cfg, workdir=work,
                             parent_run_id=parent_run_id or None, quiet=quiet))
    print(json.dumps({"model_dir": summary["model_dir"]}))
    return publish_model(summary, model, base_model=base_model)
