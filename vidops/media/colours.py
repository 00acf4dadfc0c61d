"""Named colours of an image: a histogram of its pixels over a small palette of colour words.

Pixels are named by rules in HSV space rather than by the nearest palette RGB value: what
people call "red" or "brown" is a hue range gated by saturation and value, and nearest-RGB
matching turns dark reds into black and pale blues into grey. The words are the ones captions
use ("a red square", "grey sky"), so tags and fallback captions read like prompts.
"""

from __future__ import annotations

import cv2
import numpy as np

ANNOTATOR = "vidops-colours 1"
BRIGHTNESS_ANNOTATOR = "vidops-brightness 1"

# Order is the tie-break when two colours cover exactly the same share.
NAMES = ("black", "grey", "white", "red", "orange", "brown", "yellow", "green", "cyan", "blue",
         "purple", "pink")

# Hue ranges (degrees, upper bound exclusive) for saturated pixels.
_HUES = ((15.0, "red"), (40.0, "orange"), (70.0, "yellow"), (165.0, "green"), (195.0, "cyan"),
         (255.0, "blue"), (290.0, "purple"), (340.0, "pink"), (360.1, "red"))
# Below this value (0-1) everything is black, whatever its hue.
_BLACK_V = 0.2
# Below this saturation, or this chroma (max - min, 0-1), a pixel is a grey level.
_GREY_S = 0.2
_GREY_CHROMA = 0.12
_WHITE_V = 0.8
# Dark oranges (and the orange end of red) are what people call brown; dark reds stay red.
_BROWN_HUES = (10.0, 40.0)
_BROWN_V = 0.6
# Light, weakly saturated reds are pink.
_PINK_S, _PINK_V = 0.5, 0.75

# Images are named from at most this many pixels on the long side: colour shares do not need
# more, and area averaging first removes the noise and chroma-subsampling fringes at edges.
_ANALYSIS_SIDE = 64

# Brightness buckets of the mean luma (0-255): around a third below and above mid-grey.
DARK_BELOW = 70.0
BRIGHT_ABOVE = 180.0


def _index(name: str) -> int:
    return NAMES.index(name)


def name_pixels(rgb: np.ndarray) -> np.ndarray:
    """The index into NAMES of every pixel of an RGB uint8 image (any shape [..., 3])."""
    flat = rgb.reshape(-1, 1, 3).astype(np.float32) / 255.0
    hsv = cv2.cvtColor(flat, cv2.COLOR_RGB2HSV).reshape(-1, 3)  # H 0-360, S and V 0-1
    hue, sat, val = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    chroma = flat.reshape(-1, 3).max(axis=1) - flat.reshape(-1, 3).min(axis=1)

    names = np.full(hue.shape, _index("red"), dtype=np.int64)
    lower = 0.0
    for upper, name in _HUES:
        names[(hue >= lower) & (hue < upper)] = _index(name)
        lower = upper
    red = names == _index("red")
    brownish = (hue >= _BROWN_HUES[0]) & (hue < _BROWN_HUES[1])
    names[brownish & (val < _BROWN_V)] = _index("brown")
    names[red & (sat < _PINK_S) & (val > _PINK_V)] = _index("pink")

    grey = (sat < _GREY_S) | (chroma < _GREY_CHROMA)
    names[grey] = _index("grey")
    names[grey & (val >= _WHITE_V)] = _index("white")
    names[val < _BLACK_V] = _index("black")
    return names.reshape(rgb.shape[:-1])


def colour_shares(image: np.ndarray) -> dict[str, float]:
    """The fraction of an RGB uint8 image's pixels per colour name, largest first."""
    height, width = image.shape[:2]
    scale = _ANALYSIS_SIDE / max(height, width)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    counts = np.bincount(name_pixels(image).ravel(), minlength=len(NAMES))
    total = counts.sum()
    order = sorted(range(len(NAMES)), key=lambda i: (-counts[i], i))
    return {NAMES[i]: float(counts[i] / total) for i in order if counts[i]}


# A colour must cover this share of the picture to be named: low enough for a small subject
# on a plain background (a shape in the sample corpus covers 3-7% of its frame), high enough
# that edge fringes and noise (well under 1%) are never named.
MIN_SHARE = 0.02


def dominant_colours(image: np.ndarray, max_colours: int = 3,
                     min_share: float = MIN_SHARE) -> list[str]:
    """The names of the colours covering at least `min_share` of the image, most first.

    The most frequent colour is always named, however mixed the image.
    """
    shares = colour_shares(image)
    names = [name for name, share in shares.items() if share >= min_share][:max_colours]
    return names or list(shares)[:1]


def brightness(image: np.ndarray) -> float:
    """Mean luma (ITU-R BT.601, as in JPEG and most SD video) of an RGB image, 0-255."""
    return float(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).mean())


def brightness_bucket(luma: float) -> str:
    if luma < DARK_BELOW:
        return "dark"
    if luma > BRIGHT_ABOVE:
        return "bright"
    return "normal"
