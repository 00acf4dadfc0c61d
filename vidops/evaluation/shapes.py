"""Prompt adherence for the shapes domain, read from the pixels of a generated video.

A shapes video is one coloured shape on black. Per frame, the foreground is every pixel whose
brightest channel clears a threshold; its mean colour names the colour (nearest of the
palette), its centroid track the direction (the dominant axis and sign of the motion from
the first to the last frame), and how much of its bounding box it fills the shape (a disk
fills pi/4 of its box, a square all of it, a triangle half).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from vidops.data.samples import COLOURS, FINETUNE_COLOURS

PALETTE = {**COLOURS, **FINETUNE_COLOURS}
_FILL = {"triangle": 0.5, "circle": np.pi / 4, "square": 1.0}
_PROMPT = re.compile(r"^a (\w+) (\w+) moving (\w+)$")


@dataclass(frozen=True)
class ShapeReading:
    colour: str | None
    direction: str | None
    shape: str | None
    displacement: tuple[float, float]  # (dx, dy) of the centroid, first to last frame, pixels
    foreground: float  # mean fraction of foreground pixels per frame


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """(colour, shape, direction) of `a {colour} {shape} moving {direction}`."""
    match = _PROMPT.match(prompt.strip())
    if not match:
        raise ValueError(f"not a shapes prompt: {prompt!r}")
    colour, shape, direction = match.groups()
    return colour, shape, direction


def read_shape_video(frames: np.ndarray, *, threshold: int = 60,
                     min_motion: float = 0.05) -> ShapeReading:
    """Read colour, direction and shape from RGB uint8 frames [F, H, W, 3].

    `min_motion` is the least displacement, as a fraction of the frame's side along the axis,
    that counts as moving; less reads as no direction.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3], got {frames.shape}")
    height, width = frames.shape[1:3]
    mask = frames.max(axis=-1) > threshold
    if not mask.any():
        return ShapeReading(None, None, None, (0.0, 0.0), 0.0)
    colour_mean = frames[mask].reshape(-1, 3).astype(np.float64).mean(axis=0)
    colour = min(PALETTE, key=lambda name: float(np.sum((colour_mean - PALETTE[name]) ** 2)))

    ys, xs = np.mgrid[0:height, 0:width]
    centroids, fills = [], []
    for frame_mask in mask:
        count = frame_mask.sum()
        if count < 4:
            continue
        cy, cx = ys[frame_mask].mean(), xs[frame_mask].mean()
        centroids.append((cx, cy))
        rows, cols = np.nonzero(frame_mask)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fills.append(count / box)
    direction = None
    dx = dy = 0.0
    if len(centroids) >= 2:
        track = np.array(centroids)
        # Half-track means: robust to one noisy frame at either end.
        half = max(1, len(track) // 2)
        (x0, y0), (x1, y1) = track[:half].mean(axis=0), track[-half:].mean(axis=0)
        dx, dy = float(x1 - x0), float(y1 - y0)
        if abs(dx) / width >= abs(dy) / height:
            if abs(dx) / width >= min_motion:
                direction = "right" if dx > 0 else "left"
        elif abs(dy) / height >= min_motion:
            direction = "down" if dy > 0 else "up"
    shape = None
    if fills:
        fill = float(np.median(fills))
        shape = min(_FILL, key=lambda name: abs(_FILL[name] - fill))
    return ShapeReading(colour, direction, shape, (dx, dy), float(mask.mean()))
