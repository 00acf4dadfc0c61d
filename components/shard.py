"""The shard component: splits a stage's manifest into balanced shards for a fan-out."""

from kfp import dsl

from vidops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def shard(in_dir: str, workdir: str, config_json: str, by: str = "source_sha256",
          name: str = "shards", dataset: str = "", vae_from_model: str = "") -> list:
    """Sources of the ingest output (by source_sha256) for filter/annotate, or clips of the
    curated dataset (by clip_id) for encode; config `curation.shards` of them.

    `vae_from_model` travels to the encode tasks inside the shard files: a task output fed
    into a ParallelFor body reaches it as the loop item under kfp.local (kfp 2.x)."""
    from vidops.config import config_from_json
    from vidops.data.shards import write_shards
    from vidops.stage import load_output
    from vidops.tracking.workdir import Workdir

    manifest, _ = load_output(in_dir)
    count = config_from_json(config_json).curation.shards
    return write_shards(manifest, count, Workdir.at(workdir).stage_dir(name, dataset),
                        source_dir=in_dir, id_column=by,
                        settings={"vae_from_model": vae_from_model} if vae_from_model else None)
