"""The shard component: splits a stage's manifest into balanced shards for a fan-out."""

from kfp import dsl

from vidops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def shard(in_dir: str, workdir: str, config_json: str, by: str = "source_sha256",
          name: str = "shards", dataset: str = "", vae_from_model: str = "",
          input_md5: str = "", model_run_id: str = "") -> list:
    """Sources of the ingest output (by source_sha256) for filter/annotate, or clips of the
    curated dataset (by clip_id) for encode; config `curation.shards` of them.

    `vae_from_model` travels to the encode tasks inside the shard files: a task output fed
    into a ParallelFor body reaches it as the loop item under kfp.local (kfp 2.x).

    `input_md5` (the input's DVC version) goes the same way, and names the folder the shard
    files are written to: a shard file's path is then the cache key of the task it feeds.
    `model_run_id` only keys KFP's cache (the model behind `vae_from_model` changed)."""
    from vidops.components.publish import check_input
    from vidops.config import config_from_json
    from vidops.data.shards import write_shards
    from vidops.stage import load_output
    from vidops.tracking.workdir import Workdir

    del model_run_id
    check_input(in_dir, input_md5)
    manifest, _ = load_output(in_dir)
    count = config_from_json(config_json).curation.shards
    dest = Workdir.at(workdir).stage_dir(name, dataset) / (input_md5[:16] or "unversioned")
    settings = {"input_md5": input_md5} if input_md5 else {}
    if vae_from_model:
        settings["vae_from_model"] = vae_from_model
    return write_shards(manifest, count, dest, source_dir=in_dir, id_column=by,
                        settings=settings or None)
