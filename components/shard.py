"""The shard component: splits a stage's manifest into balanced shards for a fan-out."""

from kfp import dsl

from vidops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def shard(in_dir: str, workdir: str, config_json: str, by: str = "source_sha256",
          name: str = "shards") -> list:
    """Sources of the ingest output (by source_sha256) for filter/annotate, or clips of the
    curated dataset (by clip_id) for encode; config `curation.shards` of them."""
    from vidops.config import config_from_json
    from vidops.data.shards import write_shards
    from vidops.stage import load_output
    from vidops.tracking.workdir import Workdir

    manifest, _ = load_output(in_dir)
    count = config_from_json(config_json).curation.shards
    return write_shards(manifest, count, Workdir.at(workdir).stage_dir(name),
                        source_dir=in_dir, id_column=by)
