"""Text -> video: classifier-free guided sampling in latent space, then the VAE decoder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidops.config import Config, SamplingConfig
from vidops.media.video import write_video
from vidops.models.folder import LoadedModel
from vidops.models.transformer import Denoiser
from vidops.train.objectives import sampler_for


def sampling_settings(cfg: Config, card: Mapping[str, Any] | None,
                      *overrides: Mapping[str, Any]) -> SamplingConfig:
    """How to sample the model whose card is `card`: each of sampler, steps and guidance
    scale from the first that sets it of `overrides` (most specific first, such as a
    command's flags), `cfg.generate`, the card's `sampling` (the settings it was trained and
    is evaluated with), and `cfg.train.sampling` (for a model whose card has none).

    So a registered model samples as it was evaluated, whichever profile the caller loads;
    guidance in particular moves prompt adherence by tens of points on small models."""
    layers = [*overrides, cfg.generate.model_dump(), (card or {}).get("sampling") or {},
              cfg.train.sampling.model_dump()]
    return SamplingConfig(**{
        key: next(layer[key] for layer in layers if layer.get(key) is not None)
        for key in SamplingConfig.model_fields})


@torch.no_grad()
def sample_latents(
    denoiser: Denoiser,
    *,
    scheduler_config: dict,
    latent_shape: Sequence[int],
    text: torch.Tensor,
    mask: torch.Tensor,
    uncond_text: torch.Tensor,
    uncond_mask: torch.Tensor,
    seed: int | Sequence[int],
    steps: int,
    guidance_scale: float,
    sampler: str,
) -> torch.Tensor:
    """Latents [B, *latent_shape] for the prompts embedded in `text`, `mask`.

    `seed`: one for the batch, or one per prompt, so that a video depends on its own seed
    only and batching videos (evaluation) gives the videos generating them one by one gives.

    Guidance: prediction = uncond + scale * (cond - uncond), with the negative prompt's (or
    the empty caption's) embedding as the unconditional branch; scale <= 1 samples the
    conditional branch alone.
    """
    device = text.device
    batch = text.shape[0]
    scheduler = sampler_for(scheduler_config, sampler)
    scheduler.set_timesteps(steps, device=device)
    if isinstance(seed, int):
        x = torch.randn((batch, *latent_shape), generator=torch.Generator().manual_seed(seed))
    else:
        if len(seed) != batch:
            raise ValueError(f"{len(seed)} seeds for {batch} prompts")
        x = torch.stack([torch.randn(tuple(latent_shape),
                                     generator=torch.Generator().manual_seed(int(s)))
                         for s in seed])
    x = x.to(device)
    # Flow-matching schedulers start from unit noise and take model inputs unscaled.
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    guided = guidance_scale > 1.0
    cond_text = torch.cat([uncond_text, text]) if guided else text
    cond_mask = torch.cat([uncond_mask, mask]) if guided else mask
    for t in scheduler.timesteps:
        model_in = scale_input(torch.cat([x, x]) if guided else x, t)
        timesteps = t.float().expand(model_in.shape[0]).to(device)
        prediction = denoiser(model_in, timesteps, cond_text, cond_mask)
        if guided:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(prediction, t, x, return_dict=False)[0]
    return x


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scale: float) -> np.ndarray:
    """VAE-decoded RGB uint8 frames [B, F, H, W, 3]."""
    video = vae.decode(latents / scale).sample.clamp(-1, 1)
    video = ((video + 1) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu().numpy()


def generate(
    model: LoadedModel,
    prompts: Sequence[str],
    *,
    seed: int | Sequence[int],
    steps: int,
    guidance_scale: float,
    sampler: str,
    negative_prompt: str = "",
) -> np.ndarray:
    """RGB uint8 videos [B, F, H, W, 3], one per prompt; the same seed gives the same videos
    (one seed for all, or one per prompt)."""
    if model.text is None or model.vae is None:
        raise ValueError(f"{model.path} was loaded without its VAE and text encoder "
                         "(codecs=False): it cannot turn prompts into videos")
    text, mask = model.text.encode(list(prompts))
    if negative_prompt:
        uncond, uncond_mask = model.text.encode([negative_prompt] * len(prompts))
    else:
        uncond = model.empty_caption["prompt_embeds"].float()[None].expand_as(text).to(text)
        uncond_mask = model.empty_caption["prompt_mask"][None].expand_as(mask).to(mask)
    latents = sample_latents(
        model.denoiser, scheduler_config=model.scheduler_config,
        latent_shape=model.latent_shape, text=text, mask=mask, uncond_text=uncond,
        uncond_mask=uncond_mask, seed=seed, steps=steps, guidance_scale=guidance_scale,
        sampler=sampler)
    return decode_latents(model.vae, latents, float(model.card["latent"]["scale"]))


def save_video(frames: np.ndarray, path: Path, fps: float, gif: bool = False) -> list[Path]:
    """One video [F, H, W, 3] as H.264 MP4 (and an animated GIF beside it when asked)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".partial-{path.name}")
    try:
        write_video(tmp, list(frames), fps)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    written = [path]
    if gif:
        from PIL import Image

        images = [Image.fromarray(frame) for frame in frames]
        gif_path = path.with_suffix(".gif")
        images[0].save(gif_path, save_all=True, append_images=images[1:], loop=0,
                       duration=round(1000 / fps))
        written.append(gif_path)
    return written
