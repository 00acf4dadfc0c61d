"""The curation pipeline: source videos to a curated, validated clip dataset, encoded.

    ingest -> shard -> ParallelFor(shard: filter -> annotate) -> merge (cross-shard dedup)
           -> shard (by clip) -> ParallelFor(shard: encode) -> merge_encoded

The encode shards share one VAE: the first task to need it bootstraps it on the whole curated
dataset, the others wait for it (a lock in the workdir) and reuse it.

Each stage validates its output with its Great Expectations suite; a failure fails the task
and so stops the run before anything downstream (training) could read the data.

`curate` and `encode` add their tasks to whichever pipeline calls them, so the training and
lifecycle pipelines reuse these exact sub-DAGs. Every task gets its cluster settings from
`pipelines.platform.on_cluster`, and the DVC version of its input (`input_md5`), which keys
KFP's cache by the data's content.
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
from vidops.pipelines.platform import on_cluster


def curate(sources: Any, common: dict[str, Any], cfg: Config, dataset: str = "") -> Any:
    """ingest -> fan-out(filter -> annotate) -> merge; returns the merge task. `dataset`
    prefixes every output directory, for a second corpus in the same workdir."""
    ingested = on_cluster(ingest(sources=sources, dataset=dataset, **common), "ingest", cfg)
    # The shard files carry the ingest version to the filter tasks (see shard's docstring).
    shards = on_cluster(shard(in_dir=ingested.outputs["out_dir"], workdir=common["workdir"],
                              config_json=common["config_json"], dataset=dataset,
                              input_md5=ingested.outputs["dvc_md5"]), "shard", cfg)
    with dsl.ParallelFor(shards.output) as shard_file:
        filtered = on_cluster(filter_component.filter(shard_file=shard_file, dataset=dataset,
                                                      **common), "filter", cfg)
        annotated = on_cluster(annotate(in_dir=filtered.outputs["out_dir"],
                                        input_md5=filtered.outputs["dvc_md5"], **common),
                               "annotate", cfg)
    return on_cluster(merge(in_dirs=dsl.Collected(annotated.outputs["out_dir"]),
                            input_md5s=dsl.Collected(annotated.outputs["dvc_md5"]),
                            dataset=dataset, **common), "merge", cfg)


def encode(curated: Any, common: dict[str, Any], cfg: Config, dataset: str = "",
           vae_from: Any = None) -> Any:
    """shard by clip -> fan-out(encode) -> merge_encoded; returns the merge_encoded task.
    `curated`: the task whose out_dir and dvc_md5 are the curated dataset (merge), or a
    (dir, md5) pair of pipeline parameters. `vae_from`: a training task; encode in its
    model's latent space (data to fine-tune that model on)."""
    curated_dir, curated_md5 = (curated if isinstance(curated, tuple)
                                else (curated.outputs["out_dir"], curated.outputs["dvc_md5"]))
    model = ({"vae_from_model": vae_from.outputs["model_dir"],
              "model_run_id": vae_from.outputs["mlflow_run_id"]} if vae_from else {})
    clip_shards = on_cluster(shard(in_dir=curated_dir, by="clip_id", name="encode-shards",
                                   workdir=common["workdir"], config_json=common["config_json"],
                                   dataset=dataset, input_md5=curated_md5, **model),
                             "shard", cfg).set_display_name("shard-clips")
    with dsl.ParallelFor(clip_shards.output) as clip_shard:
        encoded = on_cluster(encode_component(shard_file=clip_shard, dataset=dataset, **common),
                             "encode", cfg)
    return on_cluster(merge_encoded(in_dirs=dsl.Collected(encoded.outputs["out_dir"]),
                                    input_md5s=dsl.Collected(encoded.outputs["dvc_md5"]),
                                    dataset=dataset, **common), "merge-encoded", cfg)


def build(cfg: Config) -> Callable[..., None]:
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
        encode(curate(sources, common, cfg), common, cfg)

    return curation_pipeline
