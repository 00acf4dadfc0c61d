"""What pretrain and fine-tune share: one MLflow run around the one training loop, and the
model folder, card and training.json it leaves.

A stage (pretrain.py, finetune.py) decides what to train: it builds the denoiser, names the
VAE and text encoder whose latent space the data is in, and says how to save the result. This
module runs it the same way for both: rank 0 opens the nested MLflow run (params, the dataset
as input, metrics from the loop, sample videos, the model folder as artifacts), the Trainer
trains, and rank 0 writes the model folder, the card (with data lineage) and training.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
import torch

from vidops.config import Config, TrainConfig
from vidops.data.latent_dataset import LatentDataset, held_out_ids, training_subset
from vidops.models.sampling import decode_latents, sample_latents, sampling_settings, save_video
from vidops.models.text import TextEncoder
from vidops.models.transformer import Denoiser, count_parameters
from vidops.models.vae import load_vae
from vidops.stage import StageError, digest_of, load_output
from vidops.tracking import dvc as dvc_tracking
from vidops.tracking import mlflow_runs
from vidops.tracking.lineage import lineage_summary
from vidops.tracking.workdir import Workdir, code_version
from vidops.train.distributed import DistInfo
from vidops.train.loop import ResumeMode, Trainer

TRAINING_JSON = "training.json"
SAMPLES_DIR = "samples"
# Settings that change what training computes; the rest (logging, checkpoint cadence,
# sampling) may differ between a run and its resumption.
_COSMETIC = {"log_every", "checkpoint_every", "keep_checkpoints", "sample_every",
             "sample_prompts", "device", "sampling"}

# (out_dir, the trained denoiser, the card) -> writes the model folder at out_dir.
SaveFn = Callable[[Path, Denoiser, dict[str, Any]], None]


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


@dataclass
class TrainingJob:
    """One training run, as a stage has set it up."""

    stage: str  # the MLflow run name and the card's `kind`: pretrain | finetune
    data_dir: Path
    out_dir: Path
    cfg: Config
    train: TrainConfig  # cfg.train, or the fine-tune's settings
    denoiser: Denoiser
    text_encoder: dict[str, Any]  # the card's text_encoder entry (path, identity, ...)
    vae: dict[str, Any]  # the card's vae entry: {"path": ..., "digest": ...}
    vae_source: Path | str  # where to load the VAE from for sample videos
    scheduler_config: dict[str, Any]
    save: SaveFn
    # What else the settings digest (resume) and the card carry, per stage.
    settings: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # extra MLflow params
    deepspeed: dict[str, Any] | None = None  # a DeepSpeed config: the loop runs under it


def _sampler(cfg: Config, train: TrainConfig, out_dir: Path, vae: Any, scale: float,
             latent_shape: list[int], prompts: list[str], empties: dict[str, torch.Tensor],
             text_encoder: TextEncoder, fps: float, scheduler_config: dict[str, Any]):
    """A callback that renders the sample prompts with the (EMA) model into MP4s, logged to
    MLflow under samples/step-N, sampled as the finished model's card will say."""
    how = sampling_settings(cfg, {"sampling": train.sampling.model_dump()})

    def render(step: int, denoiser: torch.nn.Module) -> None:
        if not prompts:
            return
        device = next(denoiser.parameters()).device
        text, mask = text_encoder.encode(prompts)
        uncond = empties["prompt_embeds"].float()[None].expand_as(text).to(device)
        uncond_mask = empties["prompt_mask"][None].expand_as(mask).to(device)
        latents = sample_latents(denoiser, scheduler_config=scheduler_config,
                                 latent_shape=latent_shape, text=text.to(device),
                                 mask=mask.to(device), uncond_text=uncond,
                                 uncond_mask=uncond_mask, seed=cfg.seed, steps=how.steps,
                                 guidance_scale=how.guidance_scale, sampler=how.sampler)
        videos = decode_latents(vae, latents.cpu(), scale)
        folder = out_dir / SAMPLES_DIR / f"step-{step:08d}"
        for i, (prompt, video) in enumerate(zip(prompts, videos, strict=True)):
            save_video(video, folder / f"{i:02d}-{prompt.replace(' ', '_')[:60]}.mp4", fps)
        if mlflow.active_run() is not None:
            mlflow.log_artifacts(str(folder), artifact_path=f"samples/step-{step:08d}")
    return render


def run_training(job: TrainingJob, *, workdir: Workdir, dist: DistInfo,
                 parent_run_id: str | None, resume: ResumeMode, quiet: bool) -> dict[str, Any]:
    """Train `job`; on rank 0 write its model folder and training.json and return the
    summary (other ranks return {})."""
    cfg, data_dir, out_dir = job.cfg, job.data_dir, job.out_dir
    started = datetime.now(timezone.utc)
    manifest, info, encoding = encoded_dataset(data_dir)
    dataset = LatentDataset(data_dir)
    held_out = held_out_ids(dataset.clip_ids, job.train.holdout_fraction)
    latent_shape = [int(x) for x in encoding["latent_shape"]]
    train_settings = {k: v for k, v in job.train.model_dump(mode="json").items()
                      if k not in _COSMETIC}
    settings = digest_of({"train": train_settings, "transformer": cfg.models.transformer
                          .model_dump(mode="json"), "seed": cfg.seed,
                          "data": info["dvc"]["md5"], **job.settings})
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
        run = mlflow.start_run(experiment_id=experiment_id, run_name=job.stage,
                               parent_run_id=parent_run_id or None,
                               tags={"vidops.stage": job.stage}, log_system_metrics=False)
        mlflow_runs.log_params(cfg)
        mlflow.log_params({"world_size": dist.world_size,
                           "parameters": count_parameters(job.denoiser),
                           "trainable_parameters": count_parameters(job.denoiser, True),
                           "latent_shape": "x".join(map(str, latent_shape)),
                           "held_out_clips": len(held_out), **job.params})
        mlflow_runs.log_dataset(manifest, name=data_dir.name, digest=info["dvc"]["md5"],
                                source=dvc_tracking.DatasetVersion(**info["dvc"]).object_uri,
                                context="training")
        if job.train.sample_prompts:
            text_encoder = TextEncoder(job.text_encoder["path"],
                                       max_length=int(job.text_encoder["max_length"]),
                                       device=dist.device)
            vae = load_vae(job.vae_source).to(dist.device).eval()
            sample_fn = _sampler(cfg, job.train, out_dir, vae, scale, latent_shape,
                                 list(job.train.sample_prompts), dataset.empty_caption(),
                                 text_encoder, fps, job.scheduler_config)
    status = "FAILED"
    try:
        trainer = Trainer(job.denoiser, training_subset(dataset, held_out), job.train,
                          out_dir=out_dir, seed=cfg.seed, dist=dist,
                          empty_caption=dataset.empty_caption(),
                          settings_digest=settings, latent_scale=scale, sample_fn=sample_fn,
                          resume=resume, quiet=quiet, deepspeed=job.deepspeed,
                          scheduler_config=job.scheduler_config)
        clock = time.perf_counter()
        result = trainer.run()
        seconds = time.perf_counter() - clock
        final = trainer.final_model()  # collective under DeepSpeed: every rank calls it
        summary: dict[str, Any] = {}
        if dist.is_main:
            final_loss = result.losses[-1][1] if result.losses else float("nan")
            card = {
                "name": cfg.tracking.registered_model, "kind": job.stage,
                "arch": cfg.models.transformer.arch, "size": cfg.models.transformer.size,
                "objective": job.train.objective,
                "sampling": job.train.sampling.model_dump(mode="json"),
                "parameters": count_parameters(job.denoiser),
                "latent": {"shape": latent_shape, "scale": scale},
                "video": video,
                "text_encoder": job.text_encoder,
                "vae": job.vae,
                "training": {"steps": job.train.steps, "world_size": dist.world_size,
                             "final_loss": final_loss,
                             "trainable_parameters": count_parameters(job.denoiser, True),
                             "settings": job.train.model_dump(mode="json"),
                             "seed": cfg.seed},
                **job.card,
                "data": {**lineage_summary(data_dir),
                         "held_out": {"fraction": job.train.holdout_fraction,
                                      "clip_ids": held_out}},
                "mlflow_run_id": run.info.run_id if run else None,
                "code_version": code_version(),
                "created_at": datetime.now(timezone.utc).isoformat(),
            }
            job.save(out_dir, final, card)
            summary = {
                "stage": job.stage, "model_dir": str(out_dir), "data_dir": str(data_dir),
                "steps": job.train.steps, "resumed_from": result.resumed_from,
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
