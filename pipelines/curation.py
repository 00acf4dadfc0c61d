"""The curation pipeline: source videos to a curated, validated clip dataset, encoded.

    ingest -> shard -> ParallelFor(shard: filter -> annotate) -> merge (cross-shard dedup)
           -> shard (by clip) -> ParallelFor(shard: encode) -> merge_encoded

The encode shards share one VAE: the first task to need it bootstraps it on the whole curated
dataset, the others wait for it (a lock in the workdir) and reuse it.

Each stage validates its output with its Great Expectations suite; a failure fails the task
and so stops the run before anything downstream (training) could read the data.
"""

from kfp import dsl

from vidops.components import filter as filter_component
from vidops.components.annotate import annotate
from vidops.components.encode import encode, merge_encoded
from vidops.components.ingest import ingest
from vidops.components.merge import merge
from vidops.components.shard import shard


@dsl.pipeline(
    name="vidops-curation",
    description="Ingest, filter and annotate source videos into a curated clip dataset.",
)
def curation_pipeline(
    sources: list,
    workdir: str,
    config_json: str,
    parent_run_id: str = "",
    quiet: bool = True,
) -> None:
    common = {"workdir": workdir, "config_json": config_json}
    ingested = ingest(sources=sources, parent_run_id=parent_run_id, quiet=quiet, **common)
    shards = shard(in_dir=ingested.outputs["out_dir"], **common)
    with dsl.ParallelFor(shards.output) as shard_file:
        filtered = filter_component.filter(shard_file=shard_file, parent_run_id=parent_run_id,
                                           quiet=quiet, **common)
        annotated = annotate(in_dir=filtered.outputs["out_dir"], parent_run_id=parent_run_id,
                             quiet=quiet, **common)
    curated = merge(in_dirs=dsl.Collected(annotated.outputs["out_dir"]),
                    parent_run_id=parent_run_id, quiet=quiet, **common)
    clip_shards = shard(in_dir=curated.outputs["out_dir"], by="clip_id", name="encode-shards",
                        **common).set_display_name("shard-clips")
    with dsl.ParallelFor(clip_shards.output) as clip_shard:
        encoded = encode(shard_file=clip_shard, parent_run_id=parent_run_id, quiet=quiet,
                         **common)
    merge_encoded(in_dirs=dsl.Collected(encoded.outputs["out_dir"]),
                  parent_run_id=parent_run_id, quiet=quiet, **common)
