"""Face detection (OpenCV's Haar cascade) and irreversible face blurring.

The Haar frontal-face cascade ships inside opencv-python, so detection needs no download and
runs anywhere the package imports. Its detection window is 24x24 pixels: faces smaller than
that in the analysed frame are not found, and profile faces are not found at all. Blurring is
therefore padded generously around each box, and callers hold boxes over the frames between
detections (`hold_boxes`) rather than trusting a single frame. The cascade also fires on
texture now and then; callers count only faces an adjacent frame confirms (`confirmed`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import cv2
import numpy as np

CASCADE_FILE = "haarcascade_frontalface_default.xml"
DETECTOR = f"opencv-haar-frontalface {cv2.__version__}"
BLUR = "vidops-face-blur 1"

# A box is (x, y, width, height) in pixels of the frame it was found in.
Box = tuple[int, int, int, int]

# Detector settings: scale steps of 10% and 5 neighbours are OpenCV's documented defaults,
# the usual balance between missed faces and false positives on photographs.
SCALE_FACTOR = 1.1
MIN_NEIGHBOURS = 5
MIN_FACE_PX = 24
# Frames are extended by this fraction of their long side (edge pixels repeated) before
# detection: the cascade's windows must hold a whole face, so without it a face cut by the
# frame edge (a zoom or pan carrying it out of view, eyes and mouth still visible) is missed.
EDGE_PAD = 0.15
# How much of a box's size is added on each side before blurring: boxes hug the inner face,
# while hair, ears and chin also identify a person (and faces move between detections).
BLUR_PAD = 0.25
# The blurred face keeps this many cells across: too few to recognise anyone, enough to keep
# the frame's colours (a black box would look like a defect to the model trained on it).
BLUR_CELLS = 5


@functools.lru_cache(maxsize=1)
def _cascade() -> cv2.CascadeClassifier:
    path = cv2.data.haarcascades + CASCADE_FILE
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"cannot load OpenCV's face cascade from {path}")
    return cascade


def detect_faces(frame: np.ndarray) -> list[Box]:
    """Frontal faces in an RGB uint8 frame, largest first."""
    # No histogram equalisation: the cascade already normalises every window by its contrast,
    # and equalising a dark frame (a shape on black) turns compression noise into "faces".
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    pad = round(EDGE_PAD * max(gray.shape))
    gray = cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    found = _cascade().detectMultiScale(gray, scaleFactor=SCALE_FACTOR,
                                        minNeighbors=MIN_NEIGHBOURS,
                                        minSize=(MIN_FACE_PX, MIN_FACE_PX))
    height, width = frame.shape[:2]
    boxes = []
    for x, y, w, h in np.asarray(found).reshape(-1, 4):
        # Back to frame coordinates, clipped to the part of the face inside the frame.
        x0, y0 = max(0, int(x) - pad), max(0, int(y) - pad)
        x1, y1 = min(width, int(x + w) - pad), min(height, int(y + h) - pad)
        if x1 > x0 and y1 > y0:
            boxes.append((x0, y0, x1 - x0, y1 - y0))
    return sorted(boxes, key=lambda b: b[2] * b[3], reverse=True)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


# A face found on one frame is confirmed by a box overlapping it this much on the next (or
# previous) frame: real faces persist between adjacent frames, while the cascade's false
# positives on texture, edges and compression noise mostly flicker.
CONFIRM_IOU = 0.3


def confirmed(boxes: list[Box], neighbour: list[Box]) -> list[Box]:
    """The boxes also found, at about the same place, on an adjacent frame."""
    return [box for box in boxes if any(iou(box, other) >= CONFIRM_IOU for other in neighbour)]


def hold_boxes(detections: Mapping[int, list[Box]], frame_index: int, reach: int) -> list[Box]:
    """The boxes to blur in one frame: every box detected within `reach` frames of it.

    Detection runs on a subset of frames; a face seen on either side of a frame is assumed
    present in it, which also covers single frames on which the cascade misses a face.
    """
    boxes: list[Box] = []
    for index in range(frame_index - reach, frame_index + reach + 1):
        boxes.extend(detections.get(index, ()))
    return boxes


def blur_regions(frame: np.ndarray, boxes: Iterable[Box], pad: float = BLUR_PAD) -> np.ndarray:
    """A copy of an RGB frame with every (padded) box reduced to a smooth, unrecognisable blob."""
    out = frame.copy()
    height, width = out.shape[:2]
    for x, y, w, h in boxes:
        dx, dy = round(w * pad), round(h * pad)
        x0, y0 = max(0, x - dx), max(0, y - dy)
        x1, y1 = min(width, x + w + dx), min(height, y + h + dy)
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        region = out[y0:y1, x0:x1]
        # Averaging down to a few cells destroys the detail for good (no deconvolution can
        # bring it back, unlike a plain Gaussian); bilinear upscaling and a Gaussian then
        # leave no block edges for a viewer or a model to latch onto.
        cells = cv2.resize(region, (min(BLUR_CELLS, x1 - x0), min(BLUR_CELLS, y1 - y0)),
                           interpolation=cv2.INTER_AREA)
        smooth = cv2.resize(cells, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        kernel = max(3, (min(x1 - x0, y1 - y0) // 4) | 1)
        out[y0:y1, x0:x1] = cv2.GaussianBlur(smooth, (kernel, kernel), 0)
    return out


def laplacian_variance(gray_or_rgb: np.ndarray) -> float:
    """Sharpness of an image region: the variance of its Laplacian (low = blurry)."""
    image = gray_or_rgb
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(image, cv2.CV_64F).var())
