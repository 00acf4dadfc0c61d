"""The training pipeline: a curated clip dataset to a trained model.

    shard (by clip) -> ParallelFor(encode) -> merge_encoded -> pretrain

Encoding is content-addressed: clips the cache already holds (from the curation pipeline or an
earlier run) cost a lookup, so re-running training on the same data goes straight to pretrain.
The pretrain task carries the cluster resources of config `resources.pretrain` (CPU, memory,
GPU type and count) and is never served from KFP's cache: a training run is an experiment.
"""

from collections.abc import Callable
from typing import Any

from kfp import dsl

from vidops.components.finetune import finetune
from vidops.components.pretrain import pretrain
from vidops.config import Config, TaskResources
from vidops.pipelines.curation import encode


def pretrain_task(data_dir: Any, cfg: Config, common: dict[str, Any]) -> Any:
    return _training_task(pretrain(data_dir=data_dir, **common), cfg.resources.pretrain)


def finetune_task(data_dir: Any, base_model: Any, cfg: Config, common: dict[str, Any]) -> Any:
    return _training_task(finetune(data_dir=data_dir, base_model=base_model, **common),
                          cfg.resources.finetune)


def _training_task(task: Any, res: TaskResources) -> Any:
    task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu)
    task.set_memory_request(res.memory).set_memory_limit(res.memory)
    if res.gpus:
        if res.accelerator:
            task.set_accelerator_type(res.accelerator)
        task.set_accelerator_limit(res.gpus)
    task.set_caching_options(False)
    return task


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
        parent_run_id: str = "",
        quiet: bool = True,
    ) -> None:
        common = {"workdir": workdir, "config_json": config_json,
                  "parent_run_id": parent_run_id, "quiet": quiet}
        encoded = encode(curated_dir, common)
        pretrain_task(encoded.outputs["out_dir"], cfg, common)

    return training_pipeline
