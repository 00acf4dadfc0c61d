"""The shard component: splits the ingest manifest into balanced shards for the fan-out."""

from kfp import dsl

from vidops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def shard(ingest_dir: str, workdir: str, config_json: str) -> list:
    from vidops.config import config_from_json
    from vidops.data.shards import write_shards
    from vidops.stage import load_output
    from vidops.tracking.workdir import Workdir

    manifest, _ = load_output(ingest_dir)
    count = config_from_json(config_json).curation.shards
    return write_shards(manifest, count, Workdir.at(workdir).stage_dir("shards"),
                        source_dir=ingest_dir)
