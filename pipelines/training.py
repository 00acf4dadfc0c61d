"""The training pipeline: a curated clip dataset to a trained model.

    shard (by clip) -> ParallelFor(encode) -> merge_encoded -> pretrain

Encoding is content-addressed: clips the cache already holds (from the curation pipeline or an
earlier run) cost a lookup, so re-running training on the same data goes straight to pretrain.
The training tasks run in the CUDA image with the GPUs of config `resources.<stage>` on the
GPU nodes `kubernetes.gpu_node_selector` picks (`pipelines.platform`); KFP's cache serves them
only when `kubernetes.cache_training` is on and their data, base model and config are unchanged.
"""

from collections.abc import Callable
from typing import Any

from kfp import dsl

from vidops.components.finetune import finetune
from vidops.components.pretrain import pretrain
from vidops.config import Config
from vidops.pipelines.curation import encode
from vidops.pipelines.platform import on_cluster


def pretrain_task(encoded: Any, cfg: Config, common: dict[str, Any]) -> Any:
    """Pretraining on the encoded dataset of `encoded` (a merge_encoded task)."""
    return on_cluster(pretrain(data_dir=encoded.outputs["out_dir"],
                               input_md5=encoded.outputs["dvc_md5"], **common),
                      "pretrain", cfg)


def finetune_task(encoded: Any, base: Any, cfg: Config, common: dict[str, Any]) -> Any:
    """Fine-tuning the model of `base` (a training task) on the encoded dataset of `encoded`."""
    return on_cluster(finetune(data_dir=encoded.outputs["out_dir"],
                               input_md5=encoded.outputs["dvc_md5"],
                               base_model=base.outputs["model_dir"],
                               base_run_id=base.outputs["mlflow_run_id"], **common),
                      "finetune", cfg)


def build(cfg: Config) -> Callable[..., None]:
    @dsl.pipeline(
        name="vidops-training",
        description="Encode a curated clip dataset to latents and pretrain a Latte "
                    "diffusion transformer on them.",
    )
    def training_pipeline(
        curated_dir: str,
        workdir: str,
        config_json: str,
        curated_md5: str = "",
        parent_run_id: str = "",
        quiet: bool = True,
    ) -> None:
        common = {"workdir": workdir, "config_json": config_json,
                  "parent_run_id": parent_run_id, "quiet": quiet}
        pretrain_task(encode((curated_dir, curated_md5), common, cfg), cfg, common)

    return training_pipeline
