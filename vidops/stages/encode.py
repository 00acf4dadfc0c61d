"""Encode: curated clips -> VAE latents and caption embeddings, in a content-addressed cache.

Training never decodes a video: it reads what this stage writes (`LatentDataset`).

1. The VAE: from `models.vae.path`, or bootstrapped on the curated clips themselves (a small
   AutoencoderKLCogVideoX, `vidops.models.vae`), once per (clips, settings): parallel shard
   tasks wait on a lock for the first one to train it, then all reuse it from
   `<workdir>/models/vae-<key>`.
2. Each clip's cache key is its content (file bytes and caption), the VAE's and the text
   encoder's digests and the encode params. Only clips whose key the cache lacks are decoded
   and encoded, in batches (memory stays at one batch plus one cache shard, whatever the
   dataset size); the rest are cache hits.
3. The output is an export of the cache (`vidops.data.latent_cache.export`): hard-linked
   safetensors shards, manifest.parquet as their index, the empty caption's embedding (for
   classifier-free guidance), and, for a bootstrapped VAE, the VAE itself (`vae/`), so the
   versioned dataset holds everything needed to decode its latents.

Clips too short for `encode.frames` at `encode.stride` are rejected as `too_short`; clips
that do not decode as `unreadable`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch

from vidops.config import Config
from vidops.data.latent_cache import (
    ENCODE_STAGE,
    ENCODING_JSON,
    VAE_DIR,
    LatentCache,
    cache_key,
    export,
    write_empty_caption,
)
from vidops.data.manifest import Reason, rejected_frame
from vidops.data.shards import read_shard
from vidops.media.files import exclusive_lock, link_tree
from vidops.models.frames import check_vae_frames, latent_frames
from vidops.models.text import TextEncoder
from vidops.models.vae import (
    file_digest,
    load_or_bootstrap_vae,
    load_vae,
    read_clip,
    resolve_device,
    spatial_ratio,
    temporal_ratio,
    vae_digest,
)
from vidops.stage import StageContext, StageOutcome, digest_of, run_stage
from vidops.tracking.workdir import Workdir

STAGE = ENCODE_STAGE
CACHE_FORMAT = 1  # bump when what is stored per clip changes: every key changes with it


def clip_digest(path: Path, caption: str) -> str:
    """A clip's content: the normalised file's bytes and its caption (a re-captioned clip is
    new content for the text encoder)."""
    return digest_of({"file": file_digest(path), "caption": caption})


def _frame_counts(clips: pd.DataFrame) -> pd.Series:
    if "frames" in clips:
        return clips["frames"].astype(int)
    return (clips["duration_s"] * clips["fps"]).round().astype(int)


def _prepare_vae(ctx: StageContext, clips: pd.DataFrame, in_dir: Path) -> tuple[Any, dict]:
    """The VAE and what stage.json records of it."""
    vae_cfg = ctx.cfg.models.vae
    if vae_cfg.path:
        vae = load_vae(vae_cfg.path)
        # Identified by its weights' digest, like a bootstrapped one; where it lies (often a
        # model folder inside this workdir) is a run fact, or the same data encoded in two
        # workdirs would be two dataset versions.
        return vae, {"source": "path", "run": {"path": vae_cfg.path}}
    # Bootstrapped on every curated clip (not only this shard's), in clip_id order, so
    # every shard task arrives at the same key and the same model.
    enc = ctx.cfg.encode
    span = (enc.frames - 1) * enc.stride + 1
    ordered = clips[_frame_counts(clips) >= span].sort_values("clip_id")
    inputs = [(in_dir / p, file_digest(in_dir / p)) for p in ordered["path"]]
    models = ctx.workdir.models
    with exclusive_lock(models / ".vae-bootstrap.lock"), ctx.timed("vae_bootstrap"):
        result = load_or_bootstrap_vae(inputs, ctx.cfg, models, progress=not ctx.quiet)
    if not result.reused:
        mlflow.log_artifacts(str(result.path), artifact_path="vae")
    mlflow.log_metrics(result.metrics())
    link_tree(result.path, ctx.out_dir / VAE_DIR)
    # What identifies the VAE goes into the dataset; where it lies in this workdir, whether
    # this run trained or reused it and how long that took are run facts (stage.json).
    return result.vae, {
        "source": "bootstrap", "key": result.key, "train_clips": result.train_clips,
        "holdout_clips": result.holdout_clips, "steps": result.steps,
        "psnr_holdout_before_db": round(result.psnr_before, 3),
        "psnr_holdout_db": round(result.psnr_after, 3),
        "run": {"path": str(result.path), "reused": result.reused,
                "train_seconds": round(result.seconds, 3)},
    }


def encode_body(ctx: StageContext, shard_file: Path | None = None) -> StageOutcome:
    cfg, enc = ctx.cfg, ctx.cfg.encode
    in_dir = ctx.in_dir
    assert in_dir is not None
    curated = ctx.input_manifest()
    clips = curated
    if shard_file is not None:
        _, ids, _ = read_shard(shard_file)
        clips = curated[curated["clip_id"].isin(ids)]
    clips = clips.sort_values("clip_id").reset_index(drop=True)
    device = resolve_device(enc.device)

    with ctx.timed("models"):
        vae, vae_info = _prepare_vae(ctx, curated, in_dir)
        vae = vae.to(device).eval().requires_grad_(False)
        check_vae_frames(enc.frames, temporal_ratio(vae))
        text = TextEncoder.from_config(cfg, device=device)
        vae_id = vae_digest(vae)
    scaling = float(vae.config.scaling_factor)
    params = {"format": CACHE_FORMAT, "frames": enc.frames, "stride": enc.stride,
              "height": enc.height, "width": enc.width, "sample_latents": enc.sample_latents,
              "scaling_factor": scaling, "max_length": text.max_length}

    captions = clips["caption"].fillna("").astype(str)
    with ctx.timed("digest"):
        keys = [cache_key_of(in_dir / p, c, vae_id, text.identity, params)
                for p, c in zip(clips["path"], captions, strict=True)]
    cache = LatentCache(ctx.workdir.root / "cache" / STAGE)
    hits = cache.lookup(keys)
    todo = [i for i, key in enumerate(keys) if key not in hits]
    rejected: list[dict[str, Any]] = []

    with ctx.timed("encode"), cache.writer(shard_entries=enc.shard_clips) as writer:
        bar = ctx.progress(len(todo), "clip")
        for start in range(0, len(todo), enc.batch_size):
            batch, videos = [], []
            for i in todo[start:start + enc.batch_size]:
                row = clips.iloc[i]
                try:
                    videos.append(read_clip(in_dir / row.path, frames=enc.frames,
                                            stride=enc.stride, height=enc.height,
                                            width=enc.width))
                    batch.append(i)
                except ValueError as exc:
                    reason = (Reason.TOO_SHORT if "frames" in str(exc) else Reason.UNREADABLE)
                    # The clip named by its path in the dataset, not on this disk: the
                    # dataset's version must not depend on where its input folder lies.
                    detail = str(exc).replace(str(in_dir / row.path), str(row.path))
                    rejected.append({"id": row.clip_id, "source_uri": row.source_uri,
                                     "source_sha256": row.source_sha256,
                                     "reason": reason.value, "detail": detail})
            if batch:
                with torch.no_grad():
                    posterior = vae.encode(torch.stack(videos).to(device)).latent_dist
                    embeds, masks = text.encode([captions[i] for i in batch])
                for j, i in enumerate(batch):
                    tensors = {"latents": (posterior.mean[j] * scaling).cpu(),
                               "prompt_embeds": embeds[j].cpu(), "prompt_mask": masks[j].cpu()}
                    if enc.sample_latents:  # mean is scaled; logvar is of the unscaled latent
                        tensors["latents_logvar"] = posterior.logvar[j].cpu()
                    writer.add(keys[i], tensors)
            bar.update(len(todo[start:start + enc.batch_size]))
        bar.close()

    with ctx.timed("export"):
        embeds, masks = text.encode([""])
        write_empty_caption(ctx.out_dir, {"prompt_embeds": embeds[0].cpu(),
                                          "prompt_mask": masks[0].cpu()})
        dropped = {r["id"] for r in rejected}
        keep = [i for i in range(len(clips)) if clips.clip_id[i] not in dropped]
        carried = [c for c in ("source_sha256", "source_uri", "caption", "duration_s", "fps")
                   if c in clips]
        rows = clips.loc[keep, ["clip_id", *carried]].assign(key=[keys[i] for i in keep])
        kept = export(cache, rows.reset_index(drop=True), ctx.out_dir)

    latent_shape = [int(vae.config.latent_channels), latent_frames(enc.frames, temporal_ratio(vae)),
                    enc.height // spatial_ratio(vae), enc.width // spatial_ratio(vae)]
    encoded = len(todo) - len(rejected)
    mlflow.log_metrics({"encoded": encoded, "cache_hits": len(hits)})
    mlflow.set_tags({"vidops.vae": vae_id, "vidops.text_encoder": text.identity})
    vae_run = vae_info.pop("run", {})
    # encoding.json is part of the dataset, so of its DVC version: only what the latents
    # depend on. How this run got them (encoded or cache hits, the VAE trained or reused)
    # is in stage.json: a rerun after a crash must give the same version.
    info = {"latent_shape": latent_shape, "params": params,
            "vae": {**vae_info, "digest": vae_id, "scaling_factor": scaling,
                    "spatial_ratio": spatial_ratio(vae), "temporal_ratio": temporal_ratio(vae)},
            "text_encoder": {"identity": text.identity, "dim": text.dim,
                             "max_length": text.max_length}}
    (ctx.out_dir / ENCODING_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return StageOutcome(
        input_count=len(clips), kept=kept, rejected=rejected_frame(rejected),
        input_digest=digest_of(sorted(keys)),
        extra={"encoding": info, "run": {"encoded": encoded, "cache_hits": len(hits),
                                         "vae": vae_run}},
    )


def cache_key_of(path: Path, caption: str, vae_id: str, text_id: str,
                 params: dict[str, Any]) -> str:
    return cache_key(clip_digest(path, caption), vae_id, text_id, params)


def run_encode(
    in_dir: Path,
    out_dir: Path,
    *,
    cfg: Config,
    workdir: Workdir,
    shard_file: Path | None = None,
    parent_run_id: str | None = None,
    quiet: bool = False,
    dataset_name: str | None = None,
) -> dict[str, Any]:
    return run_stage(STAGE, lambda ctx: encode_body(ctx, shard_file), cfg=cfg, workdir=workdir,
                     out_dir=out_dir, in_dir=in_dir, parent_run_id=parent_run_id,
                     experiment=cfg.tracking.experiments.curation, quiet=quiet,
                     dataset_name=dataset_name)


def config_for_model(cfg: Config, model: str | Path, workdir: Workdir) -> Config:
    """`cfg` set to encode data in MODEL's latent space (its VAE, text encoder and clip
    geometry), as fine-tuning it needs; MODEL is anything a MODEL argument accepts."""
    from vidops.models.folder import encode_config_for
    from vidops.models.imported import resolve_model_ref

    return encode_config_for(cfg, resolve_model_ref(model, cfg=cfg, workdir=workdir))
