"""The lifecycle pipeline: source videos in, evaluated and registered models out.

    curation (ingest -> filter/annotate fan-out -> merge -> encode fan-out -> merge_encoded)
    -> pretrain -> evaluate
    -> curation of the fine-tune corpus (the same sub-DAGs, outputs prefixed `finetune-`,
       encoded in the pretrained model's latent space) -> finetune (LoRA by default)
       -> evaluate (the report compares it with the pretrained model)
    -> register the pretrained model -> dsl.If(gates) promote
    -> register the fine-tuned model -> dsl.If(gates) promote

Both models are candidates, judged by the same gates: the fine-tune is registered after the
pretrained model's promotion settled, so it must not regress against the champion that left
(the pretrained model on a first run). The same sub-DAGs as the curation and training
pipelines; the fine-tune branch is there when config `pipeline.finetune` is on.
"""

from collections.abc import Callable

from kfp import dsl

from vidops.config import Config
from vidops.pipelines.curation import curate, encode
from vidops.pipelines.promotion import evaluate_task, register_candidate, register_task
from vidops.pipelines.training import finetune_task, pretrain_task

FINETUNE_DATASET = "finetune"


def build(cfg: Config) -> Callable[..., None]:
    # A graph component of its own, defined before (not inside) the pipeline that uses it.
    candidate = register_candidate(cfg)

    @dsl.pipeline(
        name="vidops-lifecycle",
        description="Curate source videos, encode them, pretrain a text-to-video model, "
                    "fine-tune it on a second corpus, evaluate both and register them, "
                    "promoting what passes the gates.",
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
        encoded = encode(curate(sources, common, cfg), common, cfg)
        pretrained = pretrain_task(encoded, cfg, common)
        base = pretrained.outputs["model_dir"]
        base_eval = evaluate_task(base, common, cfg)
        registered = register_task(candidate, base, base_eval.outputs["eval_dir"], common)
        if cfg.pipeline.finetune:
            ft_curated = curate(finetune_sources, common, cfg, dataset=FINETUNE_DATASET)
            ft_encoded = encode(ft_curated, common, cfg, dataset=FINETUNE_DATASET,
                                vae_from=pretrained)
            tuned = finetune_task(ft_encoded, pretrained, cfg, common)
            tuned_eval = evaluate_task(tuned.outputs["model_dir"], common, cfg,
                                       compare_label="pretrained base",
                                       compare_dir=base_eval.outputs["eval_dir"])
            register_task(candidate, tuned.outputs["model_dir"],
                          tuned_eval.outputs["eval_dir"], common).after(registered)

    return lifecycle_pipeline
