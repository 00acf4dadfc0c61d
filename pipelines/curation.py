"""The curation pipeline: source videos to a curated dataset. It holds the stages that exist;
filter and annotate join it as they are built."""

from kfp import dsl
from vidops.components.ingest import ingest


@dsl.pipeline(
    name="vidops-curation",
    description="Ingest source videos into a versioned, probed and de-duplicated dataset.",
)
def curation_pipeline(
    sources: list,
    workdir: str,
    config_json: str,
    parent_run_id: str = "",
    quiet: bool = True,
) -> None:
    ingest(sources=sources, workdir=workdir, config_json=config_json,
           parent_run_id=parent_run_id, quiet=quiet).set_display_name("ingest")
