"""The pretrain component: a Latte diffusion transformer from scratch on an encoded dataset."""

from typing import NamedTuple

from kfp import dsl

from vidops.components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def pretrain(
    data_dir: str,
    workdir: str,
    config_json: str,
    model: dsl.Output[dsl.Model],
    input_md5: str = "",
    parent_run_id: str = "",
    quiet: bool = True,
) -> NamedTuple("PretrainOutputs", model_dir=str, mlflow_run_id=str, final_loss=float):
    """`input_md5`: the DVC version of `data_dir` (checked; it keys KFP's cache)."""
    import json
    from pathlib import Path

    from vidops.components.publish import check_input, publish_model
    from vidops.config import config_from_json
    from vidops.stages.pretrain import pretrain as run_pretrain
    from vidops.tracking.workdir import Workdir
    from vidops.train.launch import launch_training

    check_input(data_dir, input_md5)
    work = Workdir.at(workdir)
    cfg = config_from_json(config_json)
    out_dir = work.models / "pretrain"
    summary = launch_training(
        "pretrain", ["--workdir", str(work.root), "--data", data_dir, "--out", str(out_dir),
                     "--parent-run-id", parent_run_id, "--quiet"], out_dir, cfg,
        lambda: run_pretrain(Path(data_dir), out_dir, cfg=cfg, workdir=work,
                             parent_run_id=parent_run_id or None, quiet=quiet))
    print(json.dumps({"model_dir": summary["model_dir"]}))
    return publish_model(summary, model)
