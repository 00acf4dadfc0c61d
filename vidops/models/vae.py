"""The video VAE: diffusers' AutoencoderKLCogVideoX, loaded from a path or bootstrapped here.

Without a pretrained VAE (`models.vae.path: null`) vidops trains a small one on the curated
clips themselves, so the whole platform runs offline. The result is cached under a key made
of the clips' content digests and every setting that shapes it, so re-runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLCogVideoX
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from vidops.config import Config
from vidops.media.video import read_frames
from vidops.models.frames import check_vae_frames
from vidops.models.identity import model_digest
from vidops.stage import digest_of

# Bump when the bootstrap recipe changes, so cached VAEs made by the old recipe are not reused.
BOOTSTRAP_RECIPE = 3
BOOTSTRAP_JSON = "bootstrap.json"
# Training draws windows from at most this many windows' worth of each clip's first frames:
# varied motion phases without holding whole long clips in memory.
_WINDOWS_PER_CLIP = 4
_INIT_LOGVAR = -6.0

# Spatial compression is 2 ** (blocks - 1): the last block has no downsampler. Temporal
# compression is 2 ** log2(temporal_compression_ratio), applied by the first downsamplers.
VAE_SIZES: dict[str, dict[str, Any]] = {
    # CPU: 4x spatial, 4x temporal. Full-resolution convolutions dominate the cost, so the
    # first block stays narrow: 400 steps at 64x64x9 take ~2 min on 2 cores (~25 dB PSNR on
    # held-out shapes clips); wider blocks or more latent channels learned no faster.
    "tiny": {"block_out_channels": (8, 16, 32), "latent_channels": 4, "layers_per_block": 1,
             "norm_num_groups": 4},
    # One GPU: 8x spatial and 16 latent channels like CogVideoX's VAE, at half its width.
    "small": {"block_out_channels": (64, 128, 256, 256), "latent_channels": 16,
              "layers_per_block": 2, "norm_num_groups": 32},
}


def vae_config(size: str, *, sample_height: int = 128, sample_width: int = 128,
               temporal_ratio: int = 4) -> dict[str, Any]:
    """Constructor arguments of AutoencoderKLCogVideoX for a bootstrap size."""
    if size not in VAE_SIZES:
        raise ValueError(f"unknown VAE size {size!r}; expected one of {', '.join(VAE_SIZES)}")
    spec = VAE_SIZES[size]
    blocks = len(spec["block_out_channels"])
    return {
        **spec,
        "down_block_types": ("CogVideoXDownBlock3D",) * blocks,
        "up_block_types": ("CogVideoXUpBlock3D",) * blocks,
        "temporal_compression_ratio": temporal_ratio,
        # Only used as tiling thresholds (tiles are half these sizes).
        "sample_height": sample_height,
        "sample_width": sample_width,
    }


def _config(vae: AutoencoderKLCogVideoX | Mapping[str, Any]) -> Mapping[str, Any]:
    return vae.config if isinstance(vae, AutoencoderKLCogVideoX) else vae


def spatial_ratio(vae: AutoencoderKLCogVideoX | Mapping[str, Any]) -> int:
    """Pixels per latent along height and width, from a VAE or its config."""
    return 2 ** (len(_config(vae)["block_out_channels"]) - 1)


def temporal_ratio(vae: AutoencoderKLCogVideoX | Mapping[str, Any]) -> int:
    """Frames per latent frame (after the first), from a VAE or its config."""
    config = _config(vae)
    # Time is compressed by the first log2(ratio) downsamplers only, and there are blocks - 1.
    levels = int(math.log2(config["temporal_compression_ratio"]))
    return 2 ** min(levels, len(config["block_out_channels"]) - 1)


def load_vae(path_or_id: str | Path) -> AutoencoderKLCogVideoX:
    """A VAE folder (or a pipeline folder with `vae/`), or a hub id that is cached or reachable."""
    text = str(path_or_id)
    local = Path(text).expanduser()
    if local.exists():
        if (local / "vae" / "config.json").is_file():
            return AutoencoderKLCogVideoX.from_pretrained(local, subfolder="vae").eval()
        if (local / "config.json").is_file():
            return AutoencoderKLCogVideoX.from_pretrained(local).eval()
        raise FileNotFoundError(f"{local} holds no VAE (no config.json in it or in vae/)")
    if local.is_absolute() or text.startswith((".", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"VAE not found: {text} is no folder and no hub id (owner/name)")
    errors = []
    for subfolder in ("vae", None):
        try:
            return AutoencoderKLCogVideoX.from_pretrained(text, subfolder=subfolder).eval()
        except (OSError, ValueError) as exc:
            errors.append(str(exc).splitlines()[0])
    raise FileNotFoundError(
        f"VAE {text!r} is neither cached nor downloadable (offline?): {'; '.join(errors)}")


def vae_digest(vae_or_path: AutoencoderKLCogVideoX | str | Path) -> str:
    """Identity of a VAE: its config and weights, independent of where it was loaded from."""
    vae = vae_or_path if isinstance(vae_or_path, torch.nn.Module) else load_vae(vae_or_path)
    return model_digest(dict(vae.config), vae.state_dict())


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; data_range 2.0 for [-1, 1] tensors (= PSNR on [0, 1])."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


# ---------------------------------------------------------------------------------------------
# Clips as VAE input


def decode_resized(path: Path, height: int, width: int, max_frames: int | None = None
                   ) -> torch.Tensor:
    """A clip's frames as uint8 [T, 3, height, width]: scaled to cover, then centre-cropped.

    Every frame gets the same scale and crop, so motion is not distorted between frames.
    """
    frames = [torch.from_numpy(f) for f in read_frames(Path(path), max_frames=max_frames)]
    if not frames:
        raise ValueError(f"{path}: no frames decoded")
    video = torch.stack(frames).permute(0, 3, 1, 2).float()
    h, w = video.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        video = F.interpolate(video, size=size, mode="bilinear", antialias=True,
                              align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    video = video[..., top:top + height, left:left + width]
    return video.round().clamp(0, 255).to(torch.uint8)


def clip_window(frames: torch.Tensor, start: int, count: int, stride: int) -> torch.Tensor:
    """`count` frames every `stride` from `start` of uint8 [T, 3, H, W], as [3, F, H, W] in
    [-1, 1]: the layout and range the VAE takes."""
    window = frames[start:start + (count - 1) * stride + 1:stride]
    if len(window) < count:
        raise ValueError(f"clip has {len(frames)} frames, {count} frames at stride {stride} "
                         f"from frame {start} need {start + (count - 1) * stride + 1}")
    return window.permute(1, 0, 2, 3).float().div(127.5).sub(1.0)


def read_clip(path: Path, *, frames: int, stride: int, height: int, width: int) -> torch.Tensor:
    """The VAE input of one clip ([3, frames, height, width] in [-1, 1]), from its first frame."""
    needed = (frames - 1) * stride + 1
    video = decode_resized(path, height, width, needed)
    if len(video) < needed:
        raise ValueError(f"{path}: {len(video)} frames, {frames} frames at stride {stride} "
                         f"need {needed}")
    return clip_window(video, 0, frames, stride)


@torch.no_grad()
def reconstruct(vae: AutoencoderKLCogVideoX, videos: torch.Tensor, batch_size: int = 4
                ) -> torch.Tensor:
    """Encode (posterior mode) and decode [B, 3, F, H, W] videos in [-1, 1], clamped."""
    check_vae_frames(videos.shape[2], temporal_ratio(vae))
    device = next(vae.parameters()).device
    out = []
    for chunk in videos.split(batch_size):
        latents = vae.encode(chunk.to(device)).latent_dist.mode()
        out.append(vae.decode(latents).sample.clamp(-1, 1).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Bootstrap


@dataclass
class BootstrapResult:
    """A bootstrapped VAE and how it was made (`reused`: loaded from the cache, not trained)."""

    vae: AutoencoderKLCogVideoX
    path: Path
    psnr_before: float
    psnr_after: float
    losses: list[float]
    steps: int
    seconds: float
    train_clips: int
    holdout_clips: int
    key: str | None = None
    reused: bool = False

    @property
    def loss_first(self) -> float:
        return self.losses[0]

    @property
    def loss_last(self) -> float:
        return self.losses[-1]

    def metrics(self) -> dict[str, float]:
        return {"vae_psnr_before": self.psnr_before, "vae_psnr_after": self.psnr_after,
                "vae_loss_first": self.loss_first, "vae_loss_last": self.loss_last,
                "vae_steps": float(self.steps), "vae_seconds": self.seconds}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def bootstrap_key(clip_digests: Sequence[str], cfg: Config) -> str:
    """Cache key of a bootstrapped VAE: the clips' contents and every setting that shapes it."""
    enc = cfg.encode
    return digest_of({
        "recipe": BOOTSTRAP_RECIPE,
        "clips": sorted(clip_digests),
        "bootstrap": cfg.models.vae.bootstrap.model_dump(),
        "encode": [enc.frames, enc.stride, enc.height, enc.width],
        "seed": cfg.seed,
    }).removeprefix("sha256:")[:16]


def bootstrap_vae(
    clips: Sequence[Path],
    cfg: Config,
    out_dir: Path,
    *,
    progress: bool = False,
    digests: Sequence[str] | None = None,
) -> BootstrapResult:
    """Train a small AutoencoderKLCogVideoX on `clips` and save it into `out_dir`.

    Clips are ordered by content digest (computed unless given) and the last
    `holdout_clips` are kept out of training to measure reconstruction PSNR before and after.
    Seeded from `cfg.seed`: the same clips and settings give the same weights on one machine.
    Trains on `encode.device`; the model comes back on the CPU, as from `load_vae`.
    """
    boot, enc = cfg.models.vae.bootstrap, cfg.encode
    check_vae_frames(enc.frames, boot.temporal_ratio)
    digests = list(digests) if digests is not None else [file_digest(p) for p in clips]
    ordered = [p for _, p in sorted(zip(digests, map(Path, clips), strict=True))]
    if len(ordered) <= boot.holdout_clips:
        raise ValueError(f"the VAE bootstrap needs more clips than holdout_clips "
                         f"({boot.holdout_clips}); got {len(ordered)}")
    span = (enc.frames - 1) * enc.stride + 1
    train, holdout = [], []
    for i, path in enumerate(ordered):
        frames = decode_resized(path, enc.height, enc.width, span * _WINDOWS_PER_CLIP)
        if len(frames) < span:
            raise ValueError(f"{path}: {len(frames)} frames, the VAE bootstrap needs {span} "
                             f"({enc.frames} frames at stride {enc.stride})")
        if i < len(ordered) - boot.holdout_clips:
            train.append(frames)
        else:
            holdout.append(clip_window(frames, 0, enc.frames, enc.stride))
    held = torch.stack(holdout)
    device = resolve_device(enc.device)

    started = time.perf_counter()
    # A private RNG stream: seeding the global one would change the caller's random state.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        vae = AutoencoderKLCogVideoX(
            **vae_config(boot.size, sample_height=enc.height, sample_width=enc.width,
                         temporal_ratio=boot.temporal_ratio)).to(device)
        with torch.no_grad():
            # Start the posterior narrow (std e^-3) rather than at unit variance: the decoder
            # then trains on latents near the means it will decode later, and a short run
            # with a tiny KL weight would not narrow it by itself.
            vae.encoder.conv_out.conv.bias[vae.config.latent_channels:] = _INIT_LOGVAR
        vae.eval()
        psnr_before = psnr(reconstruct(vae, held, boot.batch_size), held, 2.0)
        picker = torch.Generator().manual_seed(cfg.seed)
        crop = _train_crop(enc.height, enc.width, spatial_ratio(vae))
        optimizer = torch.optim.AdamW(vae.parameters(), lr=boot.learning_rate)
        schedule = get_scheduler("cosine", optimizer, num_warmup_steps=min(20, boot.steps // 10),
                                 num_training_steps=boot.steps)
        losses: list[float] = []
        vae.train()
        for _ in tqdm(range(boot.steps), desc="VAE bootstrap", disable=not progress):
            batch = _sample_windows(train, boot.batch_size, enc.frames, enc.stride, crop, picker)
            if boot.colour_augment > 0:
                batch = _turn_hues(batch, picker, boot.colour_augment)
            batch = batch.to(device)
            posterior = vae.encode(batch).latent_dist
            # The decoder learns from the posterior mean, which is what encode caches and the
            # diffusion model learns to generate: sampling here only slowed it down (colours
            # came later). KL only bounds the latents.
            recon = vae.decode(posterior.mode()).sample
            loss = (_reconstruction_loss(recon, batch, boot.foreground_weight)
                    + boot.kl_weight * posterior.kl().mean())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        vae.eval()
        psnr_after = psnr(reconstruct(vae, held, boot.batch_size), held, 2.0)
        # Unit-variance latents for the diffusion model, as the LDM paper's scaling factor.
        first = torch.stack([clip_window(f, 0, enc.frames, enc.stride) for f in train[:64]])
        with torch.no_grad():
            latents = torch.cat([vae.encode(c.to(device)).latent_dist.mode()
                                 for c in first.split(boot.batch_size)])
        vae.register_to_config(scaling_factor=float(1.0 / latents.std().clamp_min(1e-6)))
    seconds = time.perf_counter() - started

    vae = vae.cpu()
    out_dir = Path(out_dir)
    vae.save_pretrained(out_dir)
    result = BootstrapResult(vae=vae, path=out_dir, psnr_before=psnr_before,
                             psnr_after=psnr_after, losses=losses, steps=boot.steps,
                             seconds=seconds, train_clips=len(train), holdout_clips=len(holdout))
    # Not asdict(): it would deep-copy the model only to drop it.
    # The folder travels into datasets and models, whose versions are content digests: what
    # varies from run to run (the time it took) stays beside it, not in it.
    record = {f.name: getattr(result, f.name) for f in fields(result)
              if f.name not in ("vae", "path", "key", "reused", "seconds")}
    record["settings"] = cfg.models.vae.bootstrap.model_dump()
    (out_dir / BOOTSTRAP_JSON).write_text(json.dumps(record, indent=1), encoding="utf-8")
    _timing_file(out_dir).write_text(json.dumps({"seconds": seconds}), encoding="utf-8")
    return result


def _timing_file(vae_dir: Path) -> Path:
    return vae_dir.with_name(f"{vae_dir.name}.timing.json")


def _reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, foreground_weight: float
                         ) -> torch.Tensor:
    """MSE, optionally weighted up where a pixel differs from its frame's median colour: a
    small subject on a plain background is otherwise a few percent of the loss, and its
    colour is what goes wrong first (on the shapes corpus, green decoded as blue in 12 of 24
    clips with plain MSE, 0 of 24 with weight 10)."""
    if foreground_weight == 0:
        return F.mse_loss(recon, target)
    background = target.flatten(3).median(dim=3).values[..., None, None]  # [B, C, F, 1, 1]
    # Colours lie in [-1, 1]: the largest channel difference, halved, is in [0, 1].
    salience = (target - background).abs().amax(dim=1, keepdim=True) / 2
    weight = 1 + foreground_weight * salience
    return (weight * (recon - target) ** 2).mean() / weight.mean()


# The grey axis (unit length) and its cross-product matrix, for hue turns about it.
_GREY_AXIS = torch.full((3,), 3 ** -0.5)
_GREY_CROSS = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) * 3 ** -0.5


def _turn_hues(batch: torch.Tensor, gen: torch.Generator, fraction: float) -> torch.Tensor:
    """A `fraction` of the clips with every colour turned by one random angle about the grey
    axis (a hue rotation that keeps black, white and greys). A VAE bootstrapped on a few
    colours otherwise learns those colours rather than colour: on the shapes corpus (red,
    green, blue, yellow) it decoded purple as blue in 12 of 12 fine-tune clips, so no
    fine-tune could teach purple on top of it. Continuous angles, not channel shuffles: the
    six shuffles of four colours still leave gaps that a new colour snaps into."""
    out = []
    for clip in batch:
        if float(torch.rand((), generator=gen)) < fraction:
            angle = float(torch.rand((), generator=gen)) * 2 * math.pi
            # Rodrigues' rotation; the grey axis passes through 0 in [-1, 1] as in [0, 1].
            turn = (math.cos(angle) * torch.eye(3) + math.sin(angle) * _GREY_CROSS
                    + (1 - math.cos(angle)) * torch.outer(_GREY_AXIS, _GREY_AXIS))
            clip = torch.einsum("ij,jfhw->ifhw", turn, clip).clamp(-1, 1)
        out.append(clip)
    return torch.stack(out)


def _train_crop(height: int, width: int, ratio: int) -> tuple[int, int]:
    """Random crops about half the frame size: the VAE is convolutional, so crops teach it the
    same at a quarter of the cost per step (at 64x64, 32x32 crops reached a higher holdout
    PSNR per second than whole frames). Never below 8 latent pixels a side."""
    def side(n: int) -> int:
        return min(n, max(n // 2 // ratio * ratio, 8 * ratio))

    return side(height), side(width)


def _sample_windows(clips: list[torch.Tensor], count: int, frames: int, stride: int,
                    crop: tuple[int, int], gen: torch.Generator, candidates: int = 4
                    ) -> torch.Tensor:
    """`count` random crops of random windows; of `candidates` crops per clip, the one with
    the most pixel variance. A crop of empty background teaches the VAE nothing, and on
    footage with small subjects (the shapes corpus: one shape on black) most random crops
    are empty: picking content-rich crops made colours come through in a third of the steps.
    """
    span = (frames - 1) * stride + 1
    out = []
    for i in torch.randint(len(clips), (count,), generator=gen).tolist():
        t, h, w = len(clips[i]), *clips[i].shape[-2:]
        best: tuple[float, torch.Tensor] | None = None
        for _ in range(candidates):
            start, top, left = (int(torch.randint(n - k + 1, (1,), generator=gen))
                                for n, k in ((t, span), (h, crop[0]), (w, crop[1])))
            window = clip_window(clips[i], start, frames, stride)
            window = window[..., top:top + crop[0], left:left + crop[1]]
            spread = float(window.std())
            if best is None or spread > best[0]:
                best = (spread, window)
        assert best is not None
        out.append(best[1])
    return torch.stack(out)


def load_or_bootstrap_vae(
    clips: Sequence[tuple[Path, str]],
    cfg: Config,
    cache_root: Path,
    *,
    progress: bool = False,
) -> BootstrapResult:
    """The VAE bootstrapped on (path, content digest) `clips`, from `<cache_root>/vae-<key>`
    when it was made before from the same clips and settings, else trained and stored there.

    Training writes into a temporary folder that is renamed into place, so an interrupted run
    never leaves a half-written VAE under a real key, and concurrent runs keep one winner.
    """
    key = bootstrap_key([d for _, d in clips], cfg)
    target = Path(cache_root) / f"vae-{key}"
    if not (target / BOOTSTRAP_JSON).is_file():
        tmp = Path(cache_root) / f".vae-{key}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            result = bootstrap_vae([p for p, _ in clips], cfg, tmp, progress=progress,
                                   digests=[d for _, d in clips])
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / BOOTSTRAP_JSON).is_file():
                    raise
            else:
                return replace(result, path=target, key=key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    record = json.loads((target / BOOTSTRAP_JSON).read_text(encoding="utf-8"))
    return BootstrapResult(
        vae=load_vae(target), path=target, psnr_before=record["psnr_before"],
        psnr_after=record["psnr_after"], losses=record["losses"], steps=record["steps"],
        seconds=_recorded_seconds(target, record), train_clips=record["train_clips"],
        holdout_clips=record["holdout_clips"], key=key, reused=True)


def _recorded_seconds(vae_dir: Path, record: dict[str, Any]) -> float:
    """How long the bootstrap took (a folder from before the timing moved out says inside)."""
    timing = _timing_file(vae_dir)
    if timing.is_file():
        return float(json.loads(timing.read_text(encoding="utf-8"))["seconds"])
    return float(record.get("seconds", 0.0))
