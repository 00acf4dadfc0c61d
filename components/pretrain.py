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
    parent_run_id: str = "",
    quiet: bool = True,
) -> NamedTuple("PretrainOutputs", model_dir=str, mlflow_run_id=str, final_loss=float):
    import json
    from pathlib import Path

    from vidops.components.publish import publish_model
    from vidops.config import config_from_json
    from vidops.stages.pretrain import pretrain as run_pretrain
    from vidops.tracking.workdir import Workdir

    work = Workdir.at(workdir)
    summary = run_pretrain(Path(data_dir), work.models / "pretrain",
                           cfg=config_from_json(config_json), workdir=work,
                           parent_run_id=parent_run_id or None, quiet=quiet)
    print(json.dumps({"model_dir": summary["model_dir"]}))
    return publish_model(summary, model)
