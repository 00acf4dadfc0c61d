"""The textbook way to curate a video, as a baseline for `vidops.media.analysis`.

Each metric is its own loop, as tutorials write them: reopen the file with
`cv2.VideoCapture`, seek to every sampled frame with `CAP_PROP_POS_FRAMES`, read it, score it;
scene cuts from PySceneDetect's own `detect(path, ContentDetector())`, which decodes the video
once more; and the kept clips cut out of yet another capture. It samples at the same rate,
uses the same score definitions and thresholds as the one-pass analysis and writes the same
normalised clips, so the benchmark compares the two designs, not two different jobs.

Seeking is what makes it slow: an H.264 decoder can only start at a keyframe, so every seek
decodes from the keyframe before the target frame (hundreds of frames apart in most files).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
from scenedetect import ContentDetector, detect

from vidops.media.analysis import (
    AnalysisSettings,
    motion_score,
    phash,
    sharpness_score,
)


@dataclass(frozen=True)
class _Info:
    fps: float
    frames: int
    width: int
    height: int


def _open(path: Path) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise OSError(f"cannot open {path}")
    return capture


def _read_at(capture: cv2.VideoCapture, index: int) -> np.ndarray | None:
    capture.set(cv2.CAP_PROP_POS_FRAMES, index)
    ok, frame = capture.read()
    return frame if ok else None


def _scaled(width: int, height: int, short_side: int, upscale: bool) -> tuple[int, int]:
    scale = short_side / min(width, height)
    if scale > 1 and not upscale:
        scale = 1.0
    return max(2, 2 * round(width * scale / 2)), max(2, 2 * round(height * scale / 2))


def naive_filter(path: Path, out_dir: Path, name: str, s: AnalysisSettings) -> dict[str, Any]:
    """Curate one video the textbook way; returns the cuts and the decision per clip."""
    path = Path(path)
    capture = _open(path)
    info = _Info(capture.get(cv2.CAP_PROP_FPS) or 25.0,
                 int(capture.get(cv2.CAP_PROP_FRAME_COUNT)),
                 int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                 int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    capture.release()
    an_size = _scaled(info.width, info.height, s.analysis_short_side, upscale=True)
    step = max(1, round(info.fps / s.sample_fps))
    sampled = list(range(0, info.frames, step))

    def grey(frame: np.ndarray) -> np.ndarray:
        return cv2.cvtColor(cv2.resize(frame, an_size, interpolation=cv2.INTER_AREA),
                            cv2.COLOR_BGR2GRAY)

    # 1. Sharpness: one capture, one seek per sampled frame.
    capture = _open(path)
    sharpness = {}
    for i in sampled:
        frame = _read_at(capture, i)
        if frame is not None:
            sharpness[i] = sharpness_score(grey(frame))
    capture.release()

    # 2. Motion: one capture, two seeks per pair of consecutive samples.
    capture = _open(path)
    motion = {}
    for i, j in itertools.pairwise(sampled):
        a, b = _read_at(capture, i), _read_at(capture, j)
        if a is not None and b is not None:
            motion[j] = motion_score(grey(a), grey(b), (j - i) / info.fps)
    capture.release()

    # 3. Mean colour: one more capture and pass of seeks.
    capture = _open(path)
    colour = {}
    for i in sampled:
        frame = _read_at(capture, i)
        if frame is not None:
            b, g, r, _ = cv2.mean(frame)
            colour[i] = (r, g, b)
    capture.release()

    # 4. Scene cuts: PySceneDetect's own API, one more full decode.
    min_scene = max(1, round(s.min_scene_s * info.fps))
    scenes = detect(str(path), ContentDetector(threshold=s.scene_threshold,
                                               min_scene_len=min_scene), start_in_scene=True)
    bounds = [(int(a.frame_num), int(b.frame_num)) for a, b in scenes] or [(0, info.frames)]
    cuts = [start for start, _ in bounds[1:]]

    # Pieces of at most max_clip_s per scene.
    max_frames = max(1, int(s.max_clip_s * info.fps + 1e-6))
    pieces = []
    for start, end in bounds:
        for piece_start in range(start, end, max_frames):
            pieces.append((piece_start, min(end, piece_start + max_frames)))

    # 5. Perceptual hashes: a capture and three seeks per piece.
    capture = _open(path)
    hashes = {}
    for start, end in pieces:
        row = []
        for k in (1, 2, 3):
            frame = _read_at(capture, start + (end - start) * k // 4)
            row.append(phash(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)) if frame is not None
                       else "0" * 16)
        hashes[start] = row
    capture.release()

    # Decisions, then the kept pieces written from one more capture each.
    decisions = []
    out_size = _scaled(info.width, info.height, s.out_short_side, upscale=False)
    for index, (start, end) in enumerate(pieces):
        inside = [i for i in sampled if start <= i < end]
        sharp = np.mean([sharpness[i] for i in inside if i in sharpness]) if inside else 0.0
        moving = [motion[i] for i in inside if i in motion and i - step >= start]
        move = np.mean(moving) if moving else 0.0
        if (end - start) / info.fps < s.min_clip_s - 1e-6:
            reason = "too_short"
        elif sharp < s.blurry_threshold:
            reason = "blurry"
        elif move < s.static_threshold:
            reason = "static"
        else:
            reason = None
            _write_clip(path, start, end, out_dir / f"{name}_{index:03d}.mp4", out_size, s)
        decisions.append({"start": start, "end": end, "reason": reason,
                          "phashes": hashes[start],
                          "mean_rgb": np.mean([colour[i] for i in inside if i in colour],
                                              axis=0).tolist() if inside else None})
    return {"cuts": cuts, "clips": decisions}


def _write_clip(path: Path, start: int, end: int, target: Path, size: tuple[int, int],
                s: AnalysisSettings) -> None:
    capture = _open(path)
    capture.set(cv2.CAP_PROP_POS_FRAMES, start)
    rate = Fraction(s.out_fps).limit_denominator(1001)
    with av.open(str(target), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"crf": str(s.crf), "preset": s.preset, "threads": "1"}
        for _ in range(start, end):
            ok, frame = capture.read()
            if not ok:
                break
            small = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(small, format="bgr24")))
        container.mux(stream.encode(None))
    capture.release()
