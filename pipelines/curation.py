"""The curation pipeline: source videos to a curated, validated clip dataset, encoded.

    ingest -> shard -> ParallelFor(shard: filter -> annotate) -> merge (cross-shard dedup)
           -> shard (by clip) -> ParallelFor(shard: encode) -> merge_encoded

The encode shards share one VAE: the first task to need it bootstraps it on the whole curated
dataset, the others wait for it (a lock in the workdir) and reuse it.

Each stage validates its output with its Great Expectations suite; a failure fails the task
and so stops the run before anything downstream (training) could read the data.

`curate` and `encode` add their tasks to whichever pipeline calls them, so the training and
lifecycle pipelines reuse these exact sub-DAGs.
"""

from collections.abc import Callable
from typing import Any

from kfp import dsl

from vidops.components import filter as filter_component
from vidops.components.annotate import annotate
from vidops.components.encode import encode as encode_component
from vidops.components.encode import merge_encoded
from vidops.components.ingest import ingest
from vidops.components.merge import merge
from vidops.components.shard import shard
from vidops.config import Config


def curate(sources: Any, common: dict[str, Any], dataset: str = "") -> Any:
    """ingest -> fan-out(filter -> annotate) -> merge; returns the merge task. `dataset`
    prefixes every output directory, for a second corpus in the same workdir."""
    ingested = ingest(sources=sources, dataset=dataset, **common)
    shards = shard(in_dir=ingested.outputs["out_dir"], workdir=common["workdir"],
                   config_json=common["config_json"], dataset=dataset)
    with dsl.ParallelFor(shards.output) as shard_file:
        filtered = filter_component.filter(shard_file=shard_file, dataset=dataset, **common)
        annotated = annotate(in_dir=filtered.outputs["out_dir"], **common)
    return merge(in_dirs=dsl.Collected(annotated.outputs["out_dir"]), dataset=dataset,
                 **common)


def encode(curated_dir: Any, common: dict[str, Any], dataset: str = "",
           vae_from_model: Any = "") -> Any:
    """shard by clip -> fan-out(encode) -> merge_encoded; returns the merge_encoded task.
    `vae_from_model`: encode in that model's latent space (data to fine-tune it on)."""
    clip_shards = shard(in_dir=curated_dir, by="clip_id", name="encode-shards",
                        workdir=common["workdir"], config_json=common["config_json"],
                        dataset=dataset, vae_from_model=vae_from_model
                        ).set_display_name("shard-clips")
    with dsl.ParallelFor(clip_shards.output) as clip_shard:
        encoded = encode_component(shard_file=clip_shard, dataset=dataset, **common)
    return merge_encoded(in_dirs=dsl.Collected(encoded.outputs["out_dir"]), dataset=dataset,
                         **common)


def build(cfg: Config) -> Callable[..., None]:
    del cfg  # the data stages take their settings from config_json at run time

    @dsl.pipeline(
        name="vidops-curation",
        description="Ingest, filter, annotate and encode source videos into a curated, "
                    "encoded clip dataset.",
    )
    def curation_pipeline(
        sources: list,
        workdir: str,
        config_json: str,
        parent_run_id: str = "",
        quiet: bool = True,
    ) -> None:
        common = {"workdir": workdir, "config_json": config_json,
                  "parent_run_id": parent_run_id, "quiet": quiet}
        curated = curate(sources, common)
        encode(curated.outputs["out_dir"], common)

    return curation_pipeline
