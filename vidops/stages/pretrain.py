"""Pretrain: a denoising transformer from scratch on an encoded (latent) dataset.

Reads a finished encode output (`vidops encode` / `merge-encoded`), builds the transformer
`models.transformer` names (Latte by default) fitted to its latents and caption embeddings,
trains it with the one training loop (`vidops.train.loop`), and writes a model folder
(`vidops.models.folder`) with the EMA weights, the VAE, the noise schedule and a model card
whose lineage names the exact dataset versions it learned from.

Runs as one process or under torchrun (`vidops pretrain --nproc N` starts torchrun itself);
only rank 0 talks to MLflow and writes files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from vidops.config import Config
from vidops.data.latent_cache import EMPTY_CAPTION
from vidops.models.folder import write_model_folder
from vidops.models.transformer import Denoiser, build_denoiser
from vidops.stage import StageError
from vidops.stages.training import TRAINING_JSON, TrainingJob, encoded_dataset, run_training
from vidops.tracking.workdir import Workdir
from vidops.train.distributed import init_distributed, shutdown
from vidops.train.loop import ResumeMode
from vidops.train.objectives import Objective

log = logging.getLogger(__name__)

__all__ = ["TRAINING_JSON", "encoded_dataset", "pretrain"]


def pretrain(
    data_dir: Path,
    out_dir: Path,
    *,
    cfg: Config,
    workdir: Workdir,
    parent_run_id: str | None = None,
    resume: ResumeMode = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """Train, write the model folder at out_dir, return what training.json records."""
    dist = init_distributed(cfg.train.device)
    try:
        job = _job(Path(data_dir).resolve(), Path(out_dir).resolve(), cfg)
        return run_training(job, workdir=workdir, dist=dist, parent_run_id=parent_run_id,
                            resume=resume, quiet=quiet)
    finally:
        shutdown(dist)


def _job(data_dir: Path, out_dir: Path, cfg: Config) -> TrainingJob:
    _, info, encoding = encoded_dataset(data_dir)
    channels, frames, height, width = (int(x) for x in encoding["latent_shape"])
    text_info = encoding["text_encoder"]
    if text_info["max_length"] != cfg.models.text_encoder.max_length:
        raise StageError(f"{data_dir} was encoded with text max_length {text_info['max_length']}"
                         f", the config says {cfg.models.text_encoder.max_length}")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every re-run
    denoiser = build_denoiser(cfg, latent_channels=channels, latent_frames=frames,
                              latent_hw=(height, width), text_dim=int(text_info["dim"]))
    # A bootstrapped VAE travels with the data (and then with the model); one from a path or
    # hub id is referenced.
    vae_dir = data_dir / "vae" if (data_dir / "vae").is_dir() else None
    # A VAE from a path: recorded where encode found it (stage.json's run facts; datasets
    # encoded before vidops 0.1 carry it in encoding.json).
    vae_path = encoding["vae"].get("path") or info.get("run", {}).get("vae", {}).get("path")
    scheduler_config = Objective.from_config(cfg.train).scheduler_config()

    def save(out: Path, trained: Denoiser, card: dict[str, Any]) -> None:
        write_model_folder(out, denoiser=trained, scheduler_config=scheduler_config,
                           empty_caption=data_dir / EMPTY_CAPTION, card=card, vae_dir=vae_dir)

    return TrainingJob(
        stage="pretrain", data_dir=data_dir, out_dir=out_dir, cfg=cfg, train=cfg.train,
        denoiser=denoiser,
        text_encoder={"name": text_info["identity"].split("@")[0],
                      "path": cfg.models.text_encoder.path, "identity": text_info["identity"],
                      "max_length": text_info["max_length"], "dim": text_info["dim"]},
        vae={"path": None if vae_dir else vae_path, "digest": encoding["vae"]["digest"]},
        vae_source=vae_dir or vae_path, scheduler_config=scheduler_config, save=save)
