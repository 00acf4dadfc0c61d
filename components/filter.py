"""The filter component: one shard of the ingest output through `vidops.stages.filter`."""

from typing import NamedTuple

from kfp import dsl

from vidops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def filter(  # the component is named after its stage, shadowing the builtin here only
    shard_file: str,
    workdir: str,
    config_json: str,
    manifest: dsl.Output[dsl.Dataset],
    dataset: str = "",
    parent_run_id: str = "",
    quiet: bool = True,
) -> NamedTuple("FilterOutputs", out_dir=str, dvc_md5=str, mlflow_run_id=str, kept=int,
                rejected=int):
    from vidops.components.publish import check_input, publish_stage
    from vidops.config import config_from_json
    from vidops.data.shards import read_shard, shard_settings
    from vidops.stages.filter import run_filter
    from vidops.tracking.workdir import Workdir

    work = Workdir.at(workdir)
    # The shard names its input: inside a ParallelFor the loop item is all a task needs.
    shard_name, _, in_dir = read_shard(shard_file)
    check_input(in_dir, shard_settings(shard_file).get("input_md5", ""))
    info = run_filter(in_dir, work.stage_dir(f"filter-{shard_name}", dataset),
                      shard_file=shard_file, cfg=config_from_json(config_json), workdir=work,
                      parent_run_id=parent_run_id or None, quiet=quiet)
    return publish_stage(info, manifest)
