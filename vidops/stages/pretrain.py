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

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
import torch

from vidops.config import Config
from vidops.data.latent_cache import EMPTY_CAPTION
from vidops.data.latent_dataset import LatentDataset
from vidops.models.folder import write_model_folder
from vidops.models.sampling import decode_latents, sample_latents, save_video
from vidops.models.transformer import build_denoiser, count_parameters
from vidops.models.vae import load_vae
from vidops.stage import StageError, digest_of, load_output
from vidops.tracking import dvc as dvc_tracking
from vidops.tracking import mlflow_runs
from vidops.tracking.lineage import lineage_summary
from vidops.tracking.workdir import Workdir, code_version
from vidops.train.distributed import DistInfo, init_distributed, shutdown
from vidops.train.loop import ResumeMode, Trainer
from vidops.train.objectives import Objective

log = logging.getLogger(__name__)

TRAINING_JSON = "training.json"
SAMPLES_DIR = "samples"
# Settings that change what training computes; the rest (logging, checkpoint cadence,
# sampling) may differ between a run and its resumption.
_COSMETIC = {"log_every", "checkpoint_every", "keep_checkpoints", "sample_every",
             "sample_prompts", "device"}


def encoded_dataset(data_dir: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(manifest, stage.json, encoding info) of a finished encode output, or a StageError."""
    manifest, info = load_output(data_dir)
    encoding = info.get("encoding")
    if encoding is None:
        raise StageError(f"{data_dir} is a {info['stage']} output, not an encoded dataset "
                         "(run vidops encode / merge-encoded first)")
    validation = info.get("validation")
    if validation is not None and not validation.get("success"):
        raise StageError(f"{data_dir} failed its Great Expectations suite: never trained on")
    return manifest, info, encoding


def _sampler(cfg: Config, out_dir: Path, vae: Any, scale: float, latent_shape: list[int],
             prompts: list[str], empties: dict[str, torch.Tensor], text_encoder: Any,
             fps: float, scheduler_config: dict[str, Any]):
    """A callback that renders the sample prompts with the (EMA) model into MP4s, logged to
    MLflow under samples/step-N."""
    def render(step: int, denoiser: torch.nn.Module) -> None:
        if not prompts:
            return
        device = next(denoiser.parameters()).device
        text, mask = text_encoder.encode(prompts)
        uncond = empties["prompt_embeds"].float()[None].expand_as(text).to(device)
        uncond_mask = empties["prompt_mask"][None].expand_as(mask).to(device)
        gen = cfg.generate
        latents = sample_latents(denoiser, scheduler_config=scheduler_config,
                                 latent_shape=latent_shape, text=text.to(device),
                                 mask=mask.to(device), uncond_text=uncond,
                                 uncond_mask=uncond_mask, seed=cfg.seed, steps=gen.steps,
                                 guidance_scale=gen.guidance_scale, sampler=gen.sampler)
        videos = decode_latents(vae, latents.cpu(), scale)
        folder = out_dir / SAMPLES_DIR / f"step-{step:08d}"
        for i, (prompt, video) in enumerate(zip(prompts, videos, strict=True)):
            save_video(video, folder / f"{i:02d}-{prompt.replace(' ', '_')[:60]}.mp4", fps)
        if mlflow.active_run() is not None:
            mlflow.log_artifacts(str(folder), artifact_path=f"samples/step-{step:08d}")
    return render


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
        return _pretrain(Path(data_dir).resolve(), Path(out_dir).resolve(), cfg, workdir, dist,
                         parent_run_id, resume, quiet)
    finally:
        shutdown(dist)


def _pretrain(data_dir: Path, out_dir: Path, cfg: Config, workdir: Workdir, dist: DistInfo,
              parent_run_id: str | None, resume: ResumeMode, quiet: bool) -> dict[str, Any]:
    from vidops.models.text import TextEncoder

    started = datetime.now(timezone.utc)
    manifest, info, encoding = encoded_dataset(data_dir)
    dataset = LatentDataset(data_dir)
    latent_shape = [int(x) for x in encoding["latent_shape"]]
    channels, frames, height, width = latent_shape
    text_info = encoding["text_encoder"]
    if text_info["max_length"] != cfg.models.text_encoder.max_length:
        raise StageError(f"{data_dir} was encoded with text max_length {text_info['max_length']}"
                         f", the config says {cfg.models.text_encoder.max_length}")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every re-run
    denoiser = build_denoiser(cfg, latent_channels=channels, latent_frames=frames,
                              latent_hw=(height, width), text_dim=int(text_info["dim"]))
    objective = Objective.from_config(cfg.train)
    train_settings = {k: v for k, v in cfg.train.model_dump(mode="json").items()
                      if k not in _COSMETIC}
    settings = digest_of({"train": train_settings, "transformer": cfg.models.transformer
                          .model_dump(mode="json"), "seed": cfg.seed,
                          "data": info["dvc"]["md5"]})

    vae_dir = data_dir / "vae" if (data_dir / "vae").is_dir() else None
    vae_source = vae_dir or encoding["vae"].get("path")
    scale = float(encoding["vae"]["scaling_factor"])
    fps = cfg.filter.normalise.fps / encoding["params"]["stride"]
    video = {"frames": encoding["params"]["frames"], "height": encoding["params"]["height"],
             "width": encoding["params"]["width"], "stride": encoding["params"]["stride"],
             "fps": fps}

    run = None
    sample_fn = None
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        mlflow_runs.configure(cfg, workdir)
        experiment_id = mlflow_runs.ensure_experiment(cfg.tracking.experiments.training, workdir)
        run = mlflow.start_run(experiment_id=experiment_id, run_name="pretrain",
                               parent_run_id=parent_run_id or None,
                               tags={"vidops.stage": "pretrain"}, log_system_metrics=False)
        mlflow_runs.log_params(cfg)
        mlflow.log_params({"world_size": dist.world_size,
                           "parameters": count_parameters(denoiser),
                           "latent_shape": "x".join(map(str, latent_shape))})
        mlflow_runs.log_dataset(manifest, name=data_dir.name, digest=info["dvc"]["md5"],
                                source=dvc_tracking.DatasetVersion(**info["dvc"]).object_uri,
                                context="training")
        if cfg.train.sample_prompts:
            text_encoder = TextEncoder.from_config(cfg, device=dist.device)
            vae = load_vae(vae_source).to(dist.device).eval()
            sample_fn = _sampler(cfg, out_dir, vae, scale, latent_shape,
                                 list(cfg.train.sample_prompts), dataset.empty_caption(),
                                 text_encoder, fps, objective.scheduler_config())
    status = "FAILED"
    try:
        trainer = Trainer(denoiser, dataset, cfg.train, out_dir=out_dir, seed=cfg.seed, dist=dist,
                          empty_caption=dataset.empty_caption(), settings_digest=settings,
                          latent_scale=scale, sample_fn=sample_fn, resume=resume, quiet=quiet)
        clock = time.perf_counter()
        result = trainer.run()
        seconds = time.perf_counter() - clock
        summary: dict[str, Any] = {}
        if dist.is_main:
            final_loss = result.losses[-1][1] if result.losses else float("nan")
            lineage = lineage_summary(data_dir)
            card = {
                "name": cfg.tracking.registered_model, "kind": "pretrain",
                "arch": cfg.models.transformer.arch, "size": cfg.models.transformer.size,
                "objective": cfg.train.objective,
                "parameters": count_parameters(denoiser),
                "latent": {"shape": latent_shape, "scale": scale},
                "video": video,
                "text_encoder": {"name": text_info["identity"].split("@")[0],
                                 "path": cfg.models.text_encoder.path,
                                 "identity": text_info["identity"],
                                 "max_length": text_info["max_length"], "dim": text_info["dim"]},
                "vae": {"path": None if vae_dir else vae_source,
                        "digest": encoding["vae"]["digest"]},
                "training": {"steps": cfg.train.steps, "world_size": dist.world_size,
                             "final_loss": final_loss,
                             "settings": cfg.train.model_dump(mode="json"),
                             "seed": cfg.seed},
                "data": lineage,
                "mlflow_run_id": run.info.run_id if run else None,
                "code_version": code_version(),
                "created_at": datetime.now(timezone.utc).isoformat(),
            }
            write_model_folder(out_dir, denoiser=trainer.final_model(),
                               scheduler_config=objective.scheduler_config(),
                               empty_caption=data_dir / EMPTY_CAPTION, card=card, vae_dir=vae_dir)
            summary = {
                "stage": "pretrain", "model_dir": str(out_dir), "data_dir": str(data_dir),
                "steps": cfg.train.steps, "resumed_from": result.resumed_from,
                "final_loss": final_loss, "losses": result.losses,
                "seconds": round(seconds, 3), "samples_per_s": result.samples_per_s,
                "tokens_per_s": result.tokens_per_s, "world_size": dist.world_size,
                "weights_digest": result.weights_digest, "rank_digests": result.rank_digests,
                "ranks_agree": result.ranks_agree, "checkpoint": result.checkpoint,
                "started_at": started.isoformat(),
                "mlflow_run_id": run.info.run_id if run else None,
                "parent_run_id": parent_run_id or None,
            }
            (out_dir / TRAINING_JSON).write_text(json.dumps(summary, indent=2) + "\n")
            mlflow.log_metrics({"final_loss": final_loss, "train_seconds": seconds,
                                "samples_per_s": result.samples_per_s})
            mlflow.set_tags({"vidops.code_version": code_version(),
                             "vidops.dataset_dvc_md5": info["dvc"]["md5"],
                             "vidops.model_dir": str(out_dir)})
            for name in sorted(p.name for p in out_dir.iterdir()):
                if name not in ("checkpoints", SAMPLES_DIR):
                    mlflow_runs.log_file(out_dir / name, artifact_path="model")
        status = "FINISHED"
        return summary
    finally:
        if run is not None:
            mlflow.end_run(status)
