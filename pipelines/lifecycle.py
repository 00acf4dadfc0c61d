"""The lifecycle pipeline: source videos in, a trained model out.

    curation (ingest -> filter/annotate fan-out -> merge -> encode fan-out -> merge_encoded)
    -> pretrain

The same sub-DAGs as the curation and training pipelines, wired end to end. Later stages
(fine-tune, evaluate, register) join here as they are built.
"""

from collections.abc import Callable

from kfp import dsl

from vidops.config import Config
from vidops.pipelines.curation import curate, encode
from vidops.pipelines.training import pretrain_task


def build(cfg: Config) -> Callable[..., None]:
    @dsl.pipeline(
        name="vidops-lifecycle",
        description="Curate source videos, encode them and pretrain a text-to-video model.",
    )
    def lifecycle_pipeline(
        sources: list,
        workdir: str,
        config_json: str,
        parent_run_id: str = "",
        quiet: bool = True,
    ) -> None:
        common = {"workdir": workdir, "config_json": config_json,
                  "parent_run_id": parent_run_id, "quiet": quiet}
        curated = curate(sources, common)
        encoded = encode(curated.outputs["out_dir"], common)
        pretrain_task(encoded.outputs["out_dir"], cfg, common)

    return lifecycle_pipeline
