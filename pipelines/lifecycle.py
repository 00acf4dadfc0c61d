"""The lifecycle pipeline: source videos in, a trained and fine-tuned model out.

    curation (ingest -> filter/annotate fan-out -> merge -> encode fan-out -> merge_encoded)
    -> pretrain
    -> curation of the fine-tune corpus (the same sub-DAGs, outputs prefixed `finetune-`,
       encoded in the pretrained model's latent space) -> finetune (LoRA by default)

The same sub-DAGs as the curation and training pipelines, wired end to end; the fine-tune
branch is there when config `pipeline.finetune` is on. Evaluate and register join here as
they are built.
"""

from collections.abc import Callable

from kfp import dsl

from vidops.config import Config
from vidops.pipelines.curation import curate, encode
from vidops.pipelines.training import finetune_task, pretrain_task

FINETUNE_DATASET = "finetune"


def build(cfg: Config) -> Callable[..., None]:
    @dsl.pipeline(
        name="vidops-lifecycle",
        description="Curate source videos, encode them, pretrain a text-to-video model and "
                    "fine-tune it on a second corpus.",
    )
    def lifecycle_pipeline(
        sources: list,
        workdir: str,
        config_json: str,
        finetune_sources: list = [],  # noqa: B006 (a KFP parameter default, never mutated)
        parent_run_id: str = "",
        quiet: bool = True,
    ) -> None:
        common = {"workdir": workdir, "config_json": config_json,
                  "parent_run_id": parent_run_id, "quiet": quiet}
        curated = curate(sources, common)
        encoded = encode(curated.outputs["out_dir"], common)
        pretrained = pretrain_task(encoded.outputs["out_dir"], cfg, common)
        if cfg.pipeline.finetune:
            base = pretrained.outputs["model_dir"]
            ft_curated = curate(finetune_sources, common, dataset=FINETUNE_DATASET)
            ft_encoded = encode(ft_curated.outputs["out_dir"], common,
                                dataset=FINETUNE_DATASET, vae_from_model=base)
            finetune_task(ft_encoded.outputs["out_dir"], base, cfg, common)

    return lifecycle_pipeline
