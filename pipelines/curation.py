"""The curation pipeline: source videos to a curated, validated clip dataset.

    ingest -> shard -> ParallelFor(shard: filter -> annotate) -> merge (cross-shard dedup)

Each stage validates its output with its Great Expectations suite; a failure fails the task
and so stops the run before anything downstream (training) could read the data.
"""

from kfp import dsl

from vidops.components import filter as filter_component
from vidops.components.annotate import annotate
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
    shards = shard(ingest_dir=ingested.outputs["out_dir"], **common)
    with dsl.ParallelFor(shards.output) as shard_file:
        filtered = filter_component.filter(shard_file=shard_file, parent_run_id=parent_run_id,
                                           quiet=quiet, **common)
        annotated = annotate(in_dir=filtered.outputs["out_dir"], parent_run_id=parent_run_id,
                             quiet=quiet, **common)
    merge(in_dirs=dsl.Collected(annotated.outputs["out_dir"]), parent_run_id=parent_run_id,
          quiet=quiet, **common)
