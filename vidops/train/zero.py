"""The DeepSpeed config of a full fine-tune (SFT): a JSON template with `"auto"` values
filled from the vidops config, so batch sizes, clipping and precision are said once.

The template is `vidops/train/deepspeed.json`, or the file `finetune.sft.deepspeed_config`
names. A value the template sets explicitly wins; only `"auto"` is filled.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from vidops.config import SftConfig, TrainConfig

TEMPLATE = "deepspeed.json"


def load_template(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        text = resources.files("vidops.train").joinpath(TEMPLATE).read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    return json.loads(text)


def deepspeed_config(sft: SftConfig, train: TrainConfig, world_size: int,
                     device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    values = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accumulation,
        "train_batch_size": train.batch_size * train.grad_accumulation * world_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization.stage": sft.zero_stage,
        "zero_optimization.offload_optimizer.device": "cpu" if sft.offload_optimizer
        else "none",
        # Pinned host memory needs a CUDA driver.
        "zero_optimization.offload_optimizer.pin_memory": cuda,
        "bf16.enabled": cuda and train.mixed_precision == "bf16",
        "fp16.enabled": cuda and train.mixed_precision == "fp16",
    }

    def fill(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            return {k: fill(v, f"{prefix}{k}.") for k, v in node.items()}
        if node == "auto":
            key = prefix[:-1]
            if key not in values:
                raise ValueError(f"DeepSpeed template: no vidops setting fills {key!r}")
            return values[key]
        return node

    config = fill(load_template(sft.deepspeed_config), "")
    if config.get("zero_optimization", {}).get("stage") == 3 and train.ema_decay > 0:
        raise ValueError("EMA keeps full copies of the weights, which ZeRO-3 partitions: "
                         "set finetune.train.ema_decay=0 with zero_stage 3")
    return config
