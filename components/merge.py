"""The merge component: annotated shards in, one validated curated dataset out."""

from typing import NamedTuple

from kfp import dsl

from vidops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def merge(
    in_dirs: list,
    workdir: str,
    config_json: str,
    manifest: dsl.Output[dsl.Dataset],
    input_md5s: list = [],  # noqa: B006 (a KFP parameter default, never mutated)
    dataset: str = "",
    parent_run_id: str = "",
    quiet: bool = True,
) -> NamedTuple("MergeOutputs", out_dir=str, dvc_md5=str, mlflow_run_id=str, kept=int,
                rejected=int):
    from vidops.components.publish import check_inputs, publish_stage
    from vidops.config import config_from_json
    from vidops.stages.merge import run_merge
    from vidops.tracking.workdir import Workdir

    work = Workdir.at(workdir)
    check_inputs(in_dirs, input_md5s)
    info = run_merge(sorted(in_dirs), work.stage_dir("curated", dataset),
                     cfg=config_from_json(config_json), workdir=work,
                     parent_run_id=parent_run_id or None, quiet=quiet)
    return publish_stage(info, manifest)
