"""Quality metrics of generated videos, confidence intervals, and distribution distances.

Per video (`video_metrics`): reference-free scores read from the pixels alone, so every
generated video can be scored without a reference set or a downloaded model. They follow the
usual definitions (SSIM, variance of the Laplacian, Farneback optical flow, VBench's motion
smoothness with a flow-based midpoint instead of VBench's learned interpolator) and work from
the 5-frame 64x64 videos of the tiny models up to 49x480x720.

Per set: Fréchet distances between feature sets, on I3D features (FVD, needs the I3D
TorchScript file) or on statistics of the model's own VAE latents (no extra model at all);
CLIP score of frames against their prompt; Student-t and Wilson intervals so that a report
says how far a mean over a few dozen videos can be trusted.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg, stats
from skimage.metrics import structural_similarity

__all__ = [
    "VIDEO_METRICS",
    "ClipScorer",
    "I3DFeatures",
    "MetricInfo",
    "frechet_distance",
    "fvd",
    "mean_ci",
    "proportion_ci",
    "vae_features",
    "video_metrics",
]


@dataclass(frozen=True)
class MetricInfo:
    label: str  # human name, e.g. "temporal consistency"
    higher_is_better: bool
    description: str  # one line: how it is computed, units


VIDEO_METRICS: dict[str, MetricInfo] = {
    "temporal_consistency": MetricInfo(
        "temporal consistency", True,
        "mean SSIM of consecutive grey frames (0-1)"),
    "sharpness": MetricInfo(
        "sharpness", True,
        "variance of the Laplacian of the middle grey frame (grey levels squared)"),
    "motion": MetricInfo(
        "motion", True,
        "1 - SSIM of the first and last grey frames (0-1); reported, not gated: "
        "neither more nor less motion is better"),
    "temporal_flickering": MetricInfo(
        "temporal flickering", False,
        "mean absolute difference of consecutive grey frames (grey levels 0-255)"),
    "dynamic_degree": MetricInfo(
        "dynamic degree", True,
        "mean Farneback optical-flow magnitude of consecutive frames (pixels per frame at the "
        "video's resolution); reported, not gated"),
    "motion_smoothness": MetricInfo(
        "motion smoothness", True,
        "1 - mean absolute error / 255 of each interior frame interpolated from its neighbours "
        "along their optical flow (0-1; nan under 3 frames)"),
}


# ------------------------------------------------------------------------------------------
# Per-video metrics


def _check_video(frames: np.ndarray, min_frames: int = 2) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    if len(frames) < min_frames or min(frames.shape[1:3]) < 3:
        raise ValueError(f"need at least {min_frames} frames of at least 3x3 px, "
                         f"got {frames.shape}")
    return frames


# Optical flow runs on frames whose short side is at most this: at 480x720 it is 4x cheaper
# than at full size and, with the same window, more accurate on the large smooth areas of
# high-resolution frames. Flow is scaled back to pixels of the video's own resolution.
_FLOW_SIDE = 256


def _flow_frames(grey: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
    """The grey frames at the flow's working size, and the factor back to full size."""
    h, w = grey[0].shape
    scale = min(1.0, _FLOW_SIDE / min(h, w))
    if scale == 1.0:
        return grey, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return [cv2.resize(g, size, interpolation=cv2.INTER_AREA) for g in grey], w / size[0]


def _flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Farneback flow [H, W, 2] from grey frame a to b, in their pixels.

    Pyramid levels grow with the frame so that the coarsest is 16-32 px: enough to follow a fast
    pan, while a 64x64 frame is not shrunk to a few meaningless pixels.
    """
    levels = max(1, min(5, int(math.log2(max(min(a.shape) / 16, 1))) + 1))
    return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, levels, 15, 3, 5, 1.2, 0)


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    # skimage's default 7x7 window does not fit tiny frames; it must be odd and fit the frame.
    win = min(7, *a.shape)
    return float(structural_similarity(a, b, win_size=win - (win % 2 == 0), data_range=255))


def _interpolation_error(prev: np.ndarray, cur: np.ndarray, nxt: np.ndarray,
                         flow: np.ndarray) -> float:
    """Mean absolute error (grey levels) of predicting `cur` halfway along `flow`, the flow from
    `prev` to `nxt`: uniform motion is predicted exactly, jerks and flicker are not."""
    h, w = cur.shape
    if flow.shape[:2] != (h, w):  # computed at the flow's working size
        flow = cv2.resize(flow, (w, h), interpolation=cv2.INTER_LINEAR) * (w / flow.shape[1])
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    fx, fy = flow[..., 0] / 2, flow[..., 1] / 2
    warp = dict(interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    back = cv2.remap(prev.astype(np.float32), gx - fx, gy - fy, **warp)
    ahead = cv2.remap(nxt.astype(np.float32), gx + fx, gy + fy, **warp)
    return float(np.abs(0.5 * (back + ahead) - cur).mean())


def video_metrics(frames: np.ndarray) -> dict[str, float]:
    """All VIDEO_METRICS of one video [F, H, W, 3] uint8 (F >= 2; ValueError on bad shape or
    dtype). Everything runs on grey frames: structure and motion, not colour, are what these
    metrics judge, and it keeps a 49x480x720 video to a few seconds of CPU."""
    frames = _check_video(frames)
    grey = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]
    small, upscale = _flow_frames(grey)
    pairs = list(itertools.pairwise(grey))
    speeds = [cv2.magnitude(*cv2.split(_flow(a, b))).mean() * upscale
              for a, b in itertools.pairwise(small)]
    errors = [_interpolation_error(grey[t - 1], grey[t], grey[t + 1],
                                   _flow(small[t - 1], small[t + 1]))
              for t in range(1, len(grey) - 1)]
    return {
        "temporal_consistency": float(np.mean([_ssim(a, b) for a, b in pairs])),
        "sharpness": float(cv2.Laplacian(grey[len(grey) // 2], cv2.CV_64F).var()),
        "motion": 1.0 - _ssim(grey[0], grey[-1]),
        "temporal_flickering": float(np.mean(
            [np.abs(a.astype(np.float32) - b).mean() for a, b in pairs])),
        "dynamic_degree": float(np.mean(speeds)),
        "motion_smoothness": 1.0 - float(np.mean(errors)) / 255.0 if errors else math.nan,
    }


# ------------------------------------------------------------------------------------------
# Confidence intervals


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """{"mean", "ci_low", "ci_high", "n"}: the mean with its Student-t interval (nans ignored).

    One value gives a zero-width interval (there is no spread to estimate), none gives nans
    and n 0, so a report can always be written.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    mean = float(x.mean())
    half = 0.0
    if n > 1:
        half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def proportion_ci(successes: int, n: int, confidence: float = 0.95) -> dict[str, float]:
    """{"mean", "ci_low", "ci_high", "n"}: a rate with its Wilson score interval, which unlike
    the normal approximation stays inside [0, 1] and is not zero-width at 0 of n or n of n."""
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    p = successes / n
    z = float(stats.norm.ppf((1 + confidence) / 2))
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 of n and n of n the bound is exactly 0 or 1; say so rather than 1e-17 or 0.99999.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return {"mean": p, "ci_low": low, "ci_high": high, "n": n}


# ------------------------------------------------------------------------------------------
# Distribution distances


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]:
    ||mu_a - mu_b||^2 + Tr(Ca + Cb - 2 sqrt(Ca Cb)).

    With fewer samples than dimensions + 1 (usual for FVD's 400 dims on a small eval set) the
    covariances are singular and so is their product, whose square root is then ill defined;
    as pytorch-fid does, eps * I is added to both covariances then (or when sqrtm fails).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected feature sets [N, D] and [M, D], got {a.shape}, {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples per set, got {len(a)} and {len(b)}")
    dims = a.shape[1]
    mu = a.mean(axis=0) - b.mean(axis=0)
    ca = np.atleast_2d(np.cov(a, rowvar=False))
    cb = np.atleast_2d(np.cov(b, rowvar=False))
    covmean = None
    if min(len(a), len(b)) > dims:
        covmean = linalg.sqrtm(ca @ cb)
    if covmean is None or not np.isfinite(covmean).all():
        offset = eps * np.eye(dims)
        covmean = linalg.sqrtm((ca + offset) @ (cb + offset))
    distance = float(mu @ mu + np.trace(ca) + np.trace(cb) - 2 * np.trace(covmean.real))
    return max(distance, 0.0)


def vae_features(latents: torch.Tensor) -> np.ndarray:
    """Features for the Fréchet distance from VAE latents [N, C, F, h, w] (the model's own VAE
    encoder, so no other model is needed): per channel the mean and std over (F, h, w), then
    the channel means (over F) pooled to a 2x2 spatial grid. N x C*6, float64.

    Low-dimensional on purpose: a few dozen videos can estimate a C*6 covariance, not a
    C*F*h*w one, and the statistics still see colour, contrast and coarse layout.
    """
    if latents.ndim != 5:
        raise ValueError(f"expected latents [N, C, F, h, w], got shape {tuple(latents.shape)}")
    x = latents.detach().to("cpu", torch.float64)
    grid = F.adaptive_avg_pool2d(x.mean(dim=2), 2).flatten(1)
    parts = [x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4), correction=0), grid]
    return torch.cat(parts, dim=1).numpy()


class I3DFeatures:
    """FVD's I3D feature extractor, from the TorchScript file of StyleGAN-V and most FVD code
    (`i3d_torchscript.pt`, 400 logits as features). It is loaded from a path, on CPU, and never
    downloaded: evaluation must not depend on the network, and a missing file should say so.
    The usual FVD protocol feeds 16-frame clips; the model resizes frames to 224x224 itself.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"I3D TorchScript file not found: {self.path} (FVD needs i3d_torchscript.pt, "
                "as used by StyleGAN-V; it is not shipped or downloaded)")
        with warnings.catch_warnings():
            # torch 2.9+ deprecates TorchScript, but the reference I3D exists only in that form.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.model = torch.jit.load(str(self.path), map_location="cpu").eval()

    @torch.inference_mode()
    def __call__(self, videos: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
        """I3D features [N, 400] (float64) of uint8 videos [F, H, W, 3]. Videos are batched
        with their same-shaped neighbours and converted to float one batch at a time, so a
        set of 49x480x720 videos never sits in memory as float all at once."""
        videos = [_check_video(v) for v in videos]
        if not videos:
            raise ValueError("no videos")
        out, start = [], 0
        while start < len(videos):
            stop = start + 1
            while (stop < len(videos) and stop - start < batch_size
                   and videos[stop].shape == videos[start].shape):
                stop += 1
            x = torch.from_numpy(np.stack(videos[start:stop])).permute(0, 4, 1, 2, 3)
            x = x.float() / 127.5 - 1.0  # [N, 3, F, H, W] in [-1, 1]
            feats = self.model(x, rescale=False, resize=True, return_features=True)
            out.append(feats.double().numpy())
            start = stop
        return np.concatenate(out)


def fvd(real: Sequence[np.ndarray], generated: Sequence[np.ndarray], i3d: I3DFeatures) -> float:
    """Fréchet video distance: frechet_distance of the I3D features of the two sets."""
    return frechet_distance(i3d(real), i3d(generated))


# ------------------------------------------------------------------------------------------
# Prompt alignment


def _embedding(output: torch.Tensor | object) -> torch.Tensor:
    # transformers 4 returns the projected embedding, 5 an output whose pooler_output it is.
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # type: ignore[attr-defined]


class ClipScorer:
    """CLIP score of a video against its prompt: 100 * cosine similarity of image and text
    embeddings, averaged over frames and clamped at 0 (torchmetrics' CLIPScore: it clamps the
    mean). The model and processor come from a local path or hub id via from_pretrained; a
    local path needs no network."""

    def __init__(self, name_or_path: str, device: str = "cpu") -> None:
        # Imported here: transformers takes seconds to import and only this scorer needs it.
        from transformers import AutoProcessor, CLIPModel

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(name_or_path).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(name_or_path)

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray, prompt: str, max_frames: int = 8) -> float:
        """Score of `max_frames` frames spread evenly over the video (uint8 [F, H, W, 3])."""
        frames = _check_video(frames, min_frames=1)
        count = min(len(frames), max(1, max_frames))
        picked = np.unique(np.linspace(0, len(frames) - 1, count).round().astype(int))
        inputs = self.processor(
            text=[prompt], images=list(frames[picked]), return_tensors="pt", padding=True,
            truncation=True, max_length=self.model.config.text_config.max_position_embeddings)
        image = _embedding(self.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(self.device)))
        text = _embedding(self.model.get_text_features(
            input_ids=inputs["input_ids"].to(self.device),
            attention_mask=inputs["attention_mask"].to(self.device)))
        cosine = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
        return max(100.0 * float(cosine.mean()), 0.0)
