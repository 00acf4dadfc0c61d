"""The encode component: one shard of the curated clips to VAE latents and text embeddings."""

from typing import NamedTuple

from kfp import dsl

from vidops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def encode(
    shard_file: str,
    workdir: str,
    config_json: str,
    manifest: dsl.Output[dsl.Dataset],
    dataset: str = "",
    parent_run_id: str = "",
    quiet: bool = True,
) -> NamedTuple("EncodeOutputs", out_dir=str, dvc_md5=str, mlflow_run_id=str, kept=int,
                rejected=int):
    from vidops.components.publish import check_input, publish_stage
    from vidops.config import config_from_json
    from vidops.data.shards import read_shard, shard_settings
    from vidops.stages.encode import config_for_model, run_encode
    from vidops.tracking.workdir import Workdir

    work = Workdir.at(workdir)
    # As for filter: inside a ParallelFor the shard file (which names the curated dataset it
    # partitions) is all a task needs.
    shard_name, _, in_dir = read_shard(shard_file)
    check_input(in_dir, shard_settings(shard_file).get("input_md5", ""))
    out_dir = work.stage_dir(f"encode-{shard_name}", dataset)
    cfg = config_from_json(config_json)
    vae_from_model = shard_settings(shard_file).get("vae_from_model")
    if vae_from_model:  # data for fine-tuning that model: encoded in its latent space
        cfg = config_for_model(cfg, vae_from_model, work)
    info = run_encode(in_dir, out_dir, shard_file=shard_file, cfg=cfg, workdir=work,
                      parent_run_id=parent_run_id or None, quiet=quiet)
    return publish_stage(info, manifest)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def merge_encoded(
    in_dirs: list,
    workdir: str,
    config_json: str,
    manifest: dsl.Output[dsl.Dataset],
    input_md5s: list = [],  # noqa: B006 (a KFP parameter default, never mutated)
    dataset: str = "",
    parent_run_id: str = "",
    quiet: bool = True,
) -> NamedTuple("MergeEncodedOutputs", out_dir=str, dvc_md5=str, mlflow_run_id=str, kept=int,
                rejected=int):
    from vidops.components.publish import check_inputs, publish_stage
    from vidops.config import config_from_json
    from vidops.stages.merge_encoded import MERGED, run_merge_encoded
    from vidops.tracking.workdir import Workdir

    work = Workdir.at(workdir)
    check_inputs(in_dirs, input_md5s)
    info = run_merge_encoded(sorted(in_dirs), work.stage_dir(MERGED, dataset),
                             cfg=config_from_json(config_json), workdir=work,
                             parent_run_id=parent_run_id or None, quiet=quiet)
    return publish_stage(info, manifest)
