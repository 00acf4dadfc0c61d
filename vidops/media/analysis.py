"""One decode pass per video: quality metrics, scene cuts, clips, hashes and normalised output.

The filter stage needs, for every source video, its scene cuts, a sharpness and a motion score
per clip, perceptual hashes for near-duplicate detection, and the kept clips re-encoded to one
size and frame rate. Doing each of those with its own reader (reopen, seek, decode) multiplies
the cost of the only expensive thing, decoding; so `analyse_video` decodes each video exactly
once, front to back, and derives everything from that one stream of frames. It is built to
cost little more than the decode itself (benchmarks/curation.py, 360p sources: the analysis
adds about a third to the CPU time of decoding; writing every clip at the default 128 px and
24 fps adds another third, nearly all of it swscale and x264):

* Decoding is single-threaded: the filter runs one worker process per video, which scales
  across cores with no synchronisation, where decoder threads in every worker would only
  oversubscribe the cores and add overhead.
* Each decoded frame is scaled once, by swscale (C, SIMD; one reusable context, one thread),
  straight to the *output* size in yuv420p, the encoder's own input format. Those frames are
  buffered for the current clip, so a kept clip is encoded from memory without any further
  conversion, and a clip rejected as too short, blurry or static is never encoded at all.
  Buffering output-size frames bounds memory by clip length times the *output* frame size
  (a 10 s clip at 228x128 is about 11 MB), whatever the source resolution.
* The small frames the metrics need are derived from those output frames, not from the
  full-size source, by OpenCV's integer-factor area reduction of the Y, U and V planes.
* Scene cuts come from PySceneDetect's `ContentDetector` (its HSV difference score, threshold
  and flash filter), fed a tiny frame (half the analysis size) for every source frame, so a
  cut lands on the exact frame. Frames go to it in batches of 32, stacked, so that its cost
  is a few OpenCV calls per batch rather than a dozen Python-level calls per frame; in
  suppress mode the filter reports a cut on the frame where it happens, so clips are still
  closed while streaming, one batch behind the decoder.
* The costly metrics, sharpness (Laplacian) and motion (Farneback optical flow), run only on
  frames sampled at `sample_fps`, at the analysis scale, where scores do not depend on the
  source's resolution.

Clips are the scenes, split into pieces of at most `max_clip_s`. A piece shorter than
`min_clip_s` is `too_short`; otherwise it is `blurry` when its sharpness is below
`blurry_threshold`, else `static` when its motion is below `static_threshold`, else kept and
written normalised: H.264 (x264 with `preset` and `crf`, one thread) in MP4 at `out_fps`,
short side scaled to `out_short_side` (never upscaled) with the aspect ratio kept and both
sides even, no audio.

A display rotation (the display matrix phones write instead of turning the pixels) is
honoured: frames are scaled in their stored orientation and then turned by quarter turns, so
a portrait phone video gives portrait clips and metrics, hashes and cuts see what a player
shows. A stream whose frame size changes part-way (concatenated segments) cannot be
normalised to one size without distorting a part of it: `UnsupportedVideo`.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import av.error
import cv2
import numpy as np
from av.video.frame import PictureType
from av.video.reformatter import Interpolation, VideoReformatter
from scenedetect import ContentDetector, FrameTimecode

from vidops.media.probe import display_rotation
from vidops.media.video import x264_options

try:  # PySceneDetect >= 0.7: the flash filter takes FrameTimecodes
    from scenedetect.detector import FlashFilter

    _TIMECODES = True
except ImportError:  # pragma: no cover - 0.6.x: frame numbers
    from scenedetect.scene_detector import FlashFilter  # type: ignore[no-redef]

    _TIMECODES = False

__all__ = [
    "AnalysisError",
    "AnalysisSettings",
    "ClipResult",
    "UnsupportedVideo",
    "VideoAnalysis",
    "analyse_video",
    "motion_score",
    "phash",
    "phash_distance",
    "sharpness_score",
    "thumbnail",
    "thumbnail_distance",
]

# Farneback parameters for the half-analysis-scale frames the flow runs on (short side 32 px by
# default): a 3-level pyramid follows a fast pan's several pixels per sample interval, and a
# small window keeps the flow of a small moving object from being averaged into the background.
_FLOW_ARGS = (0.5, 3, 9, 2, 5, 1.1, 0)  # pyr_scale, levels, winsize, iterations, poly_n, sigma
# Variance of the Laplacian (grey levels squared) below which a frame holds too little structure
# at a scale to tell sharp from blurred: about a 3-level curvature.
_DETAIL_FLOOR = 10.0
_EPS = 1e-6
# Frames handed to the scene detector at a time: its Python overhead is per batch, and a batch
# of frames at the metric size (228x128 by default) is ~1.3 MB.
_BATCH = 32


class AnalysisError(Exception):
    """The video cannot be decoded through; the message is the decoder's own words."""

    reason = "unreadable"


class UnsupportedVideo(AnalysisError):
    """The video decodes but cannot be normalised (its frame size changes part-way)."""

    reason = "unsupported"


@dataclass(frozen=True)
class AnalysisSettings:
    """How `analyse_video` measures, splits, decides and writes.

    Values come from the `filter` section of the configuration (params.yaml holds the defaults,
    calibrated on the sample corpora, seeds 0 and 1, and the cases in tests/test_analysis.py;
    see `vidops.stages.filter.analysis_settings`). The comments say what each separates.
    """

    # Metrics are computed on frames scaled so that their short side is this many pixels, so
    # scores mean the same for a 360p and a 1080p source. 64 px still resolves a small shape
    # and blur, and keeps Farneback (the costliest metric) cheap.
    analysis_short_side: int
    # Frames per second sampled for sharpness and motion: two samples even in a 1 s clip.
    sample_fps: float
    # ContentDetector threshold (mean HSV difference of consecutive frames, 0-255). Inside the
    # fastest pans and zooms of the sample and benchmark corpora frames score up to 23 (27,
    # the library's default, leaves little room); hard cuts between photographs 44 and more.
    scene_threshold: float
    # Minimum scene length for the detector: a second cut within this time is suppressed.
    min_scene_s: float
    # Pieces shorter than this are dropped as too_short.
    min_clip_s: float
    # Longer scenes are split into pieces of at most this.
    max_clip_s: float
    # Sharpness (fine/coarse detail ratio, see sharpness_score) below this: blurry. A photo
    # blurred with sigma 6 at 192 px scores 0.17-0.26; plain sharp content (a zoom into a
    # colour wheel) 0.56; sharp photos and shapes 0.95-3.
    blurry_threshold: float
    # Motion (analysis-scale pixels per second, see motion_score) below this: static. A still
    # photo encoded as video scores 0.02, a slow 15 % zoom over 4 s 1.1, a small shape
    # drifting across a black frame 2 and more.
    static_threshold: float
    # Normalised output: frame rate (source frames picked by timestamp), short side (never
    # upscaled; both sides even), x264 quality and speed.
    out_fps: float
    out_short_side: int
    crf: int
    preset: str
    # The decoder refuses frames of more pixels than this (FFmpeg's max_pixels; 0: its own
    # limit). Ingest has already rejected files that declare more (ingest.limits.max_pixels).
    max_pixels: int = 0

    def __post_init__(self) -> None:
        if self.analysis_short_side < 8:
            raise ValueError("analysis_short_side must be at least 8")
        if self.out_short_side < 2:
            raise ValueError("out_short_side must be at least 2")
        for name in ("sample_fps", "out_fps", "max_clip_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.min_clip_s < 0 or self.min_scene_s < 0:
            raise ValueError("min_clip_s and min_scene_s must not be negative")




@dataclass(frozen=True)
class ClipResult:
    """One piece of one scene: where it is in the source, its scores, the decision, output."""

    clip_index: int  # running index within the video (rejected pieces count too)
    scene_index: int  # which scene (0-based) the clip comes from
    start_frame: int  # source frame numbers (decode order from 0), [start_frame, end_frame)
    end_frame: int
    start_s: float  # source time of start_frame / end_frame, from the first frame
    end_s: float
    sharpness: float  # mean sharpness_score of the sampled frames (blurred < 0.4 < sharp)
    motion: float  # mean motion_score: analysis-scale pixels per second
    frame_diff: float  # mean absolute difference of consecutive sampled frames (0-255)
    phash: str  # 64-bit DCT perceptual hash of the middle frame, 16 lowercase hex digits
    phashes: tuple[str, ...]  # hashes at 25 / 50 / 75 % of the clip
    mean_rgb: tuple[float, float, float]  # mean colour of the sampled frames (0-255)
    thumbnails: tuple[str, ...]  # colour thumbnails at 25 / 50 / 75 % (`thumbnail`, hex)
    reason: str | None  # None: kept; else "too_short" | "blurry" | "static"
    path: Path | None  # the normalised clip, when kept
    width: int  # normalised clip size, fps and frame count (0 when not written)
    height: int
    fps: float
    frames: int


@dataclass(frozen=True)
class VideoAnalysis:
    """What one pass over one video found: every piece of every scene, kept or not."""

    frames_decoded: int
    fps: float  # the source's average frame rate
    cuts: tuple[int, ...]  # source frame numbers where a new scene starts (0 excluded)
    clips: tuple[ClipResult, ...]


# ------------------------------------------------------------------------------------------
# Per-frame scores (public so that tests and baselines use the very same definitions)


def phash_distance(a: str, b: str) -> int:
    """Hamming distance between two hex perceptual hashes (number of differing bits)."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def phash(gray: np.ndarray) -> str:
    """64-bit DCT perceptual hash of a grey (or luma) image, as 16 lowercase hex digits.

    The classic pHash: shrink to 32x32 (discarding detail, noise and size), take the 2-D DCT,
    keep the 8x8 lowest frequencies and set one bit per coefficient above their median.
    Re-encoding, rescaling and mild colour shifts flip few bits; other content about half.
    """
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8]
    return np.packbits(low > np.median(low)).tobytes().hex()


# Thumbnail planes: luma 16x16, chroma 8x8 each (4:2:0, like the frames they come from).
_THUMB_LUMA, _THUMB_CHROMA = 16, 8


def thumbnail(frame: av.VideoFrame) -> str:
    """A colour thumbnail of a yuv420p frame: its Y, U and V planes area-averaged to 16x16,
    8x8 and 8x8, as 384 bytes in hex. It complements the grey, frame-global pHash where that
    is weak: on a dark frame with one small object the hash is nearly all background, while
    the thumbnail keeps where the object is and what colour it has."""
    y, u, v = _planes(frame)
    return b"".join(
        cv2.resize(plane, (side, side), interpolation=cv2.INTER_AREA).tobytes()
        for plane, side in ((y, _THUMB_LUMA), (u, _THUMB_CHROMA), (v, _THUMB_CHROMA))
    ).hex()


def _thumbnail_planes(hexed: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(hexed), np.uint8).astype(np.float32)


def thumbnail_distance(a: str, b: str) -> float:
    """How different two thumbnails are, relative to how much they show: the summed absolute
    difference over the summed deviation of each from its own median (per plane), plus a
    floor of 2 grey levels per value so that two flat frames compare by their levels alone.

    Scale-free, so one threshold serves a busy photograph and a small shape on black: a
    re-encode (smaller, blockier, in another container) scores about 0.02-0.1; the same shape
    shifted by a tenth of the frame, or another photograph, 0.3 and more."""
    x, y = _thumbnail_planes(a), _thumbnail_planes(b)
    luma = _THUMB_LUMA * _THUMB_LUMA
    bounds = (0, luma, luma + _THUMB_CHROMA**2, x.size)
    energy = 2.0 * x.size
    for lo, hi in itertools.pairwise(bounds):
        for t in (x, y):
            energy += float(np.abs(t[lo:hi] - np.median(t[lo:hi])).sum())
    return float(np.abs(x - y).sum()) / energy


def _sharpness(gray: np.ndarray) -> tuple[float, np.ndarray]:
    half = cv2.pyrDown(gray)
    fine = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_32F))[1][0, 0] ** 2
    coarse = cv2.meanStdDev(cv2.Laplacian(half, cv2.CV_32F))[1][0, 0] ** 2
    return float((fine + _DETAIL_FLOOR) / (coarse + _DETAIL_FLOOR)), half


def sharpness_score(gray: np.ndarray) -> float:
    """How sharp a grey frame (at the analysis scale) is: the variance of its Laplacian
    relative to that of the same frame at half the scale, so 1 means "as much detail in the
    finest octave as in the next", a blurred frame scores about 0.1-0.3, a sharp one 1-3.

    The raw variance of the Laplacian measures detail, not focus: a sharp but plain subject (a
    zoom into a colour wheel, a wall) scores below a blurred busy photograph, so no threshold
    on it separates blurry from sharp on real footage. Blur removes the finest octave first,
    whatever the contrast, and the ratio sees exactly that. `_DETAIL_FLOOR` is added to both
    variances, so a frame with almost no structure at either scale scores about 1 ("no
    evidence of blur") instead of a ratio of two noise levels.
    """
    return _sharpness(gray)[0]


def _motion(prev_half: np.ndarray, half: np.ndarray, dt: float) -> float:
    flow = cv2.calcOpticalFlowFarneback(prev_half, half, None, *_FLOW_ARGS)
    magnitude = cv2.magnitude(flow[..., 0], flow[..., 1])
    return 2.0 * float(cv2.mean(magnitude)[0]) / max(dt, _EPS)


def motion_score(prev_gray: np.ndarray, gray: np.ndarray, dt: float) -> float:
    """Mean Farneback optical-flow magnitude between two grey frames `dt` seconds apart, in
    analysis-scale pixels per second (independent of the source's frame rate and of the
    sampling rate). The flow is computed at half the analysis scale, where it costs 7x less
    and still follows a small object, and doubled back to analysis-scale pixels."""
    return _motion(cv2.pyrDown(prev_gray), cv2.pyrDown(gray), dt)


# ------------------------------------------------------------------------------------------
# Helpers


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def _scaled_size(width: int, height: int, short_side: int, *, upscale: bool) -> tuple[int, int]:
    """(w, h) with the short side `short_side` (left as is if already smaller and not
    `upscale`), the aspect ratio kept, both even (yuv420p and x264 need even sizes)."""
    scale = short_side / min(width, height)
    if scale > 1 and not upscale:
        scale = 1.0
    return _even(width * scale), _even(height * scale)


def _turn(frame: av.VideoFrame, turns: int) -> av.VideoFrame:
    """A yuv420p frame (even sides) turned counter-clockwise by `turns` quarter turns."""
    planes = [np.rot90(plane, turns) for plane in _planes(frame)]
    height, width = planes[0].shape
    flat = np.concatenate([plane.ravel() for plane in planes])
    return av.VideoFrame.from_ndarray(flat.reshape(height * 3 // 2, width), format="yuv420p")


def _planes(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero-copy views of a yuv420p frame's Y, U and V planes (line padding cut off)."""
    y, u, v = (
        np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width]
        for p in frame.planes
    )
    return y, u, v


def _shrink(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a uint8 plane: area averaging down, through OpenCV's fast path for integer
    factors as far as it goes; bilinear up (only for sources smaller than the analysis)."""
    h, w = plane.shape
    if (w, h) == (width, height):
        return plane
    if width > w or height > h:
        return cv2.resize(plane, (width, height), interpolation=cv2.INTER_LINEAR)
    factor = min(w // width, h // height)
    if factor >= 2 and (w, h) != (width * factor, height * factor):
        # Reduce by the integer factor first (cropping the few odd pixels), then the rest.
        plane = cv2.resize(plane[: h - h % factor, : w - w % factor], (w // factor, h // factor),
                           interpolation=cv2.INTER_AREA)
    return cv2.resize(plane, (width, height), interpolation=cv2.INTER_AREA)


# BT.601 limited-range Y'CbCr to B, G, R, as one affine transform for cv2.transform.
_YUV_TO_BGR = np.array([
    [1.164, 2.018, 0.0, -1.164 * 16 - 2.018 * 128],
    [1.164, -0.391, -0.813, -1.164 * 16 + (0.391 + 0.813) * 128],
    [1.164, 0.0, 1.596, -1.164 * 16 - 1.596 * 128],
], dtype=np.float32)


def _reduce(planes: list[np.ndarray], factor: int) -> np.ndarray:
    """Area-reduce equal planes (H, W) by an integer factor dividing H and W, in one OpenCV
    call on the planes stacked vertically (their rows never mix): (N, H/f, W/f)."""
    h, w = planes[0].shape
    stacked = np.concatenate(planes)
    if factor > 1:
        stacked = cv2.resize(stacked, (w // factor, len(planes) * h // factor),
                             interpolation=cv2.INTER_AREA)
    return stacked.reshape(len(planes), h // factor, w // factor)


class _SceneCuts(ContentDetector):
    """PySceneDetect's ContentDetector (its score, threshold and flash filter), in batches.

    The score is the stock one, the weighted mean absolute difference of the H, S and V
    planes of consecutive frames (edges off), but computed for a batch of frames at once:
    the stock `process_frame` spends about 110 us of Python and numpy temporaries per frame,
    a tenth of decoding a 360p frame, where one batch costs a few OpenCV calls. The flash
    filter, which in suppress mode changes state only on frames above the threshold (cuts are
    reported on the frame where they happen, nothing is held back), then sees those frames
    and the first one, with the FrameTimecodes it expects.
    """

    def __init__(self, threshold: float, min_scene_len: int, fps: float) -> None:
        super().__init__(threshold=threshold, min_scene_len=min_scene_len,
                         filter_mode=FlashFilter.Mode.SUPPRESS)
        self._rate = Fraction(fps).limit_denominator(1001)
        self._last_hsv: np.ndarray | None = None
        self._started = False
        w = self._weights
        total = abs(w.delta_hue) + abs(w.delta_sat) + abs(w.delta_lum)
        self._channel_weights = np.array([w.delta_hue, w.delta_sat, w.delta_lum]) / total
        self._pixel_weights: np.ndarray | None = None

    def scores(self, yuv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Frame scores of a batch of small frames, (N, h, w, 3) uint8 Y'UV in order, and the
        frames in BGR."""
        n, h, w, _ = yuv.shape
        bgr = cv2.transform(yuv.reshape(n * h, w, 3), _YUV_TO_BGR)
        hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV).reshape(n, h * w * 3)
        previous = np.empty_like(hsv)
        previous[1:] = hsv[:-1]
        previous[0] = hsv[0] if self._last_hsv is None else self._last_hsv
        self._last_hsv = hsv[-1].copy()
        if self._pixel_weights is None or self._pixel_weights.size != h * w * 3:
            # Weighted mean over pixels and channels as one matrix-vector product.
            weights = np.tile(self._channel_weights / (h * w), h * w)
            self._pixel_weights = weights.astype(np.float32)
        scores = cv2.absdiff(hsv, previous).astype(np.float32) @ self._pixel_weights
        return scores, bgr.reshape(n, h, w, 3)

    def is_cut(self, index: int, score: float) -> bool:
        """Whether source frame `index`, of frame score `score`, starts a new scene."""
        above = score >= self._threshold
        if not above and self._started:
            return False
        self._started = True
        timecode = FrameTimecode(index, self._rate) if _TIMECODES else index
        return bool(self._flash_filter.filter(timecode, above))


_MALLOC_TUNED = False


def _keep_freed_memory() -> None:
    """Have glibc keep up to 64 MiB of freed heap instead of trimming it back to the OS.

    A clip's output frames are freed together when it is closed, and the next clip's are
    allocated right after: by default glibc returns the top of the heap to the OS each time
    and every 4 KiB page then faults back in, about 3 % of the pass in system time. Once per
    process; a no-op where mallopt is missing (and harmless where it is not glibc's)."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD


@contextmanager
def _cv2_single_thread() -> Iterator[None]:
    """OpenCV in one thread while analysing: parallelism is one process per video."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


@dataclass
class _Sample:
    frame: int
    sharpness: float
    rgb: tuple[float, float, float]
    motion: float | None  # against the previous sample of the same scene
    diff: float | None


# (source frame number, source time, frame kept, output frames it fills): the frame kept is
# the output-size frame when it fills output frames, else the (small) frame the metrics are
# taken from, which still serves the perceptual hashes.
_Buffered = tuple[int, float, av.VideoFrame, int]
# A decoded frame waiting for the detector: (number, time, frame the metrics are taken from,
# frame kept, output frames it fills)
_Pending = tuple[int, float, av.VideoFrame, av.VideoFrame, int]


@dataclass
class _Pass:
    """State of one pass. Decoded frames are handed over in batches (the scene detector's
    unit of work); clips are closed as soon as they are known: at a cut, when a piece reaches
    max_clip_s (one full piece is held back so that a too-short tail can be merged into it
    and the pair split evenly rather than the tail lost), and at the end of the video. Only
    the output frames of open pieces are buffered."""

    out_dir: Path
    name: str
    s: AnalysisSettings
    fps: float
    out_w: int
    out_h: int
    an_w: int
    an_h: int
    detector: _SceneCuts
    tiny_factor: int  # detector frames: the metric frames reduced by this (even) factor
    clips: list[ClipResult] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    cuts: list[int] = field(default_factory=list)
    buf: list[_Buffered] = field(default_factory=list)  # the current scene's open frames
    samples: list[_Sample] = field(default_factory=list)  # the current scene's samples
    scene_index: int = 0
    held: tuple[int, int] | None = None  # a full piece, closed with or after the next one
    piece_start: int = 0
    piece_start_t: float = 0.0
    next_sample: float = 0.0
    prev_gray: np.ndarray | None = None
    prev_half: np.ndarray | None = None
    prev_t: float = 0.0
    frames_decoded: int = 0

    def feed(self, batch: list[_Pending]) -> None:
        """Detect cuts in a batch of consecutive frames, then split, buffer and sample them."""
        if not batch:
            return
        k = self.tiny_factor
        s = self.s
        first = _planes(batch[0][2])
        height, width = first[0].shape[0] // k * k, first[0].shape[1] // k * k
        planes = [first] + [_planes(p[2]) for p in batch[1:]]
        y = _reduce([p[0][:height, :width] for p in planes], k)
        u = _reduce([p[1][: height // 2, : width // 2] for p in planes], k // 2)
        v = _reduce([p[2][: height // 2, : width // 2] for p in planes], k // 2)
        scores, tiny_bgr = self.detector.scores(np.stack((y, u, v), axis=-1))

        is_cut = self.detector.is_cut
        max_clip = s.max_clip_s - _EPS
        buf = self.buf
        for j, (index, t, _, kept, slots) in enumerate(batch):
            if is_cut(index, float(scores[j])) and index > 0:
                self.close_scene(index, t)
                self.cuts.append(index)
                self.start_scene(index, t)
            elif t - self.piece_start_t >= max_clip:
                self.split_piece(index, t)
            buf.append((index, t, kept, slots))
            if t >= self.next_sample - _EPS:
                self.sample(index, t, planes[j][0], tiny_bgr[j])

    def sample(self, index: int, t: float, luma: np.ndarray, tiny_bgr: np.ndarray) -> None:
        step = 1.0 / self.s.sample_fps
        self.next_sample += step * (int((t - self.next_sample) / step + _EPS) + 1)
        gray = _shrink(luma, self.an_w, self.an_h)
        sharpness, half = _sharpness(gray)
        b, g, r, _ = cv2.mean(tiny_bgr)
        motion = diff = None
        if self.prev_gray is not None and self.prev_half is not None:
            motion = _motion(self.prev_half, half, t - self.prev_t)
            diff = float(cv2.mean(cv2.absdiff(self.prev_gray, gray))[0])
        self.samples.append(_Sample(index, sharpness, (r, g, b), motion, diff))
        self.prev_gray, self.prev_half, self.prev_t = gray, half, t

    def frame_time(self, index: int) -> float:
        return self.buf[index - self.buf[0][0]][1]

    def start_scene(self, index: int, t: float) -> None:
        """Frame `index` starts a scene: sampling restarts on it, and no flow is measured
        across the cut."""
        self.scene_index += 1
        self.piece_start, self.piece_start_t = index, t
        self.buf.clear()
        self.samples.clear()
        self.held = None
        self.next_sample, self.prev_gray, self.prev_half = t, None, None

    def close_scene(self, end: int, end_t: float) -> None:
        """The scene ends before frame `end` (at time `end_t`): close its open pieces."""
        if not self.buf:
            return
        pieces = [self.held] if self.held is not None else []
        if end > self.piece_start:
            pieces.append((self.piece_start, end))
        if len(pieces) == 2 and end_t - self.piece_start_t < self.s.min_clip_s - _EPS:
            first, last = pieces[0][0], pieces[1][1]
            middle = first + (last - first) // 2
            pieces = [(first, middle), (middle, last)]
        for start, stop in pieces:
            self.close_piece(start, stop, end_t if stop == end else self.frame_time(stop))

    def split_piece(self, index: int, t: float) -> None:
        """The current piece is full: frame `index` starts the next one (and is sampled)."""
        if self.held is not None:
            held_start, held_end = self.held
            self.close_piece(held_start, held_end, self.frame_time(held_end))
            del self.buf[: held_end - self.buf[0][0]]
        self.held = (self.piece_start, index)
        self.piece_start, self.piece_start_t = index, t
        self.next_sample = min(self.next_sample, t)
        self.samples = [x for x in self.samples if x.frame >= self.held[0]]

    def close_piece(self, start: int, end: int, end_t: float) -> None:
        s = self.s
        first = self.buf[0][0]
        frames = self.buf[start - first: end - first]
        start_t = frames[0][1]
        inside = [x for x in self.samples if start <= x.frame < end]
        if not inside and self.samples:  # only when sample_fps is below the piece rate
            inside = [min(self.samples, key=lambda x: abs(x.frame - (start + end) / 2))]
        motions = [x.motion for x in inside if x.motion is not None]
        diffs = [x.diff for x in inside if x.diff is not None]
        sharpness = float(np.mean([x.sharpness for x in inside])) if inside else 0.0
        motion = float(np.mean(motions)) if motions else 0.0
        frame_diff = float(np.mean(diffs)) if diffs else 0.0
        r, g, b = np.mean([x.rgb for x in inside], axis=0) if inside else (0.0, 0.0, 0.0)
        n = len(frames)
        marks = [frames[(n * k) // 4][2] for k in (1, 2, 3)]
        hashes = tuple(phash(_planes(frame)[0]) for frame in marks)
        thumbs = tuple(thumbnail(frame) for frame in marks)
        out_frames = sum(f[3] for f in frames)

        reason: str | None = None
        if end_t - start_t < s.min_clip_s - _EPS or out_frames == 0:
            reason = "too_short"
        elif sharpness < s.blurry_threshold:
            reason = "blurry"
        elif motion < s.static_threshold:
            reason = "static"
        index = len(self.clips)
        path = None
        if reason is None:
            path = self.out_dir / f"{self.name}_{index:03d}.mp4"
            self.encode(path, frames)
        self.clips.append(ClipResult(
            clip_index=index, scene_index=self.scene_index, start_frame=start, end_frame=end,
            start_s=round(start_t, 6), end_s=round(end_t, 6), sharpness=sharpness,
            motion=motion, frame_diff=frame_diff, phash=hashes[1], phashes=hashes,
            mean_rgb=(float(r), float(g), float(b)), thumbnails=thumbs, reason=reason, path=path,
            width=self.out_w if path else 0, height=self.out_h if path else 0,
            fps=float(s.out_fps) if path else 0.0, frames=out_frames if path else 0,
        ))

    def encode(self, path: Path, frames: list[_Buffered]) -> None:
        """Encode buffered output frames, beside the target and renamed into place, so that an
        interrupted run never leaves a partial file under a clip's name."""
        tmp = path.with_name(f".partial-{path.name}")
        self.written.append(tmp)
        try:
            self._write(tmp, frames)
        except av.error.FFmpegError as exc:  # not the input's fault: no AnalysisError
            raise OSError(f"cannot write {path}: {exc}") from exc
        os.replace(tmp, path)
        self.written[-1] = path

    def _write(self, tmp: Path, frames: list[_Buffered]) -> None:
        rate = Fraction(self.s.out_fps).limit_denominator(1001)
        with av.open(str(tmp), mode="w", format="mp4",
                     options={"fflags": "+bitexact"}) as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = self.out_w, self.out_h, "yuv420p"
            # Reproducible bytes (one thread: parallelism is one process per video).
            stream.options = x264_options(self.s.crf, self.s.preset)
            time_base = 1 / rate
            pts = 0
            for _, _, frame, slots in frames:
                # A decoded frame's picture type would force x264's frame type; let it choose.
                frame.pict_type = PictureType.NONE
                frame.time_base = time_base
                for _ in range(slots):
                    frame.pts = pts
                    pts += 1
                    container.mux(stream.encode(frame))
            container.mux(stream.encode(None))


class _Scaler:
    """swscale to a yuv420p size given in display orientation, then `turns` quarter turns
    counter-clockwise (the scaling happens in the stored orientation)."""

    def __init__(self, turns: int) -> None:
        self.turns = turns % 4
        self.reformatter = VideoReformatter()

    def reformat(self, frame: av.VideoFrame, width: int, height: int, fmt: str, *,
                 interpolation: Interpolation, threads: int) -> av.VideoFrame:
        if self.turns % 2:
            width, height = height, width
        scaled = self.reformatter.reformat(frame, width, height, fmt,
                                           interpolation=interpolation, threads=threads)
        return _turn(scaled, self.turns) if self.turns else scaled


# ------------------------------------------------------------------------------------------
# The pass


def analyse_video(
    path: Path, out_dir: Path, name: str, settings: AnalysisSettings
) -> VideoAnalysis:
    """Analyse one video in a single decode pass and write its kept clips.

    Kept clips are written as ``out_dir / f"{name}_{clip_index:03d}.mp4"``. Raises
    AnalysisError when the file cannot be opened or fails to decode part-way (the decoder's
    error detection is set to fail loudly rather than conceal damage with garbage frames);
    clips written before the failure are removed, so a failed video leaves nothing behind.
    """
    path, out_dir = Path(path), Path(out_dir)
    _keep_freed_memory()
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise AnalysisError(f"cannot open: {exc}") from exc
    run: _Pass | None = None
    try:
        with container, _cv2_single_thread():
            if not container.streams.video:
                raise AnalysisError("no video stream")
            stream = container.streams.video[0]
            run = _prepare(stream, out_dir, name, settings)
            try:
                _decode(container, stream, run)
            except av.error.FFmpegError as exc:
                raise AnalysisError(
                    f"does not decode past frame {run.frames_decoded}: {exc}") from exc
    except BaseException:
        if run is not None:
            for written in run.written:
                written.unlink(missing_ok=True)
        raise
    return VideoAnalysis(frames_decoded=run.frames_decoded, fps=round(run.fps, 6),
                         cuts=tuple(run.cuts), clips=tuple(run.clips))


def _prepare(stream: av.VideoStream, out_dir: Path, name: str, s: AnalysisSettings) -> _Pass:
    ctx = stream.codec_context
    if not ctx.width or not ctx.height:
        raise AnalysisError(f"video stream has no frame size (codec {ctx.name})")
    stream.thread_type = "NONE"
    ctx.thread_count = 1
    ctx.options = {"err_detect": "explode",
                   **({"max_pixels": str(s.max_pixels)} if s.max_pixels else {})}
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 25.0
    width, height = int(ctx.width), int(ctx.height)
    sar = stream.sample_aspect_ratio
    if sar and sar > 0 and sar != 1:  # anamorphic: the output has square pixels
        width = round(width * float(sar))
    out_w, out_h = _scaled_size(width, height, s.out_short_side, upscale=False)
    an_w, an_h = _scaled_size(width, height, s.analysis_short_side, upscale=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The detector sees the metric frames (output size, or analysis size when smaller)
    # reduced by an even integer factor to about half the analysis size.
    work_short = min(out_w, out_h) if out_w >= an_w and out_h >= an_h else min(an_w, an_h)
    tiny_factor = max(2, 2 * round(work_short / max(8, s.analysis_short_side // 2) / 2))
    detector = _SceneCuts(s.scene_threshold, max(0, round(s.min_scene_s * fps)), fps)
    return _Pass(out_dir, name, s, fps, out_w, out_h, an_w, an_h, detector, tiny_factor)


def _decode(container: av.container.InputContainer, stream: av.VideoStream, run: _Pass) -> None:
    """The hot loop: per frame one swscale call and the timestamp bookkeeping; everything
    else runs per batch of frames (`_Pass.feed`), where it costs a few calls per batch.

    Output frames sit on the out_fps grid: each output frame shows the source frame nearest
    to it in time, so source frame i fills the grid points between the midpoints to its
    neighbours (none when the source is faster and it falls between two points, several when
    the source is slower). That needs the next frame's time, so frames are handed on one
    frame late."""
    s = run.s
    frames = container.decode(stream)
    first = next(frames, None)
    if first is None:
        raise AnalysisError("the video stream yields no decodable frame")
    # Display rotation: frames are scaled in their stored orientation, then turned.
    turns = display_rotation(first) // 90
    if turns % 2:
        run.out_w, run.out_h, run.an_w, run.an_h = run.out_h, run.out_w, run.an_h, run.an_w
    out_w, out_h, an_w, an_h = run.out_w, run.out_h, run.an_w, run.an_h
    size = (first.width, first.height)
    fps = run.fps
    to_output = _Scaler(turns)
    to_analysis = _Scaler(turns)
    # Metrics are taken from the output frames, unless those are smaller than the analysis.
    from_output = out_w >= an_w and out_h >= an_h
    area = Interpolation.AREA
    out_fps = s.out_fps
    batch: list[_Pending] = []
    # The previous frame, waiting for this one's time: (number, time, decoded frame, frame
    # the metrics are taken from). Its scaled frames are made as soon as it is decoded,
    # while its pixels are still in the CPU's caches.
    previous: tuple[int, float, av.VideoFrame, av.VideoFrame] | None = None
    first_slot = 0  # the first grid point the previous frame may fill
    t0: float | None = None
    index = -1

    def hand_on(slots: int) -> None:
        assert previous is not None
        number, t, frame, work = previous
        kept = work
        if slots:
            kept = work if from_output else to_output.reformat(
                frame, out_w, out_h, "yuv420p", interpolation=area, threads=1)
        batch.append((number, t, work, kept, slots))
        if len(batch) == _BATCH:
            run.feed(batch)
            batch.clear()

    for index, frame in enumerate(itertools.chain([first], frames)):
        if (frame.width, frame.height) != size:
            raise UnsupportedVideo(
                f"frame size changes from {size[0]}x{size[1]} to {frame.width}x{frame.height} "
                f"at frame {index}: one video is normalised at one size")
        run.frames_decoded = index + 1
        t = frame.time
        if t0 is None:
            t0 = t or 0.0
        t = index / fps if t is None else t - t0
        if previous is not None:
            if t <= previous[1]:  # missing or repeated timestamps: keep time moving forward
                t = previous[1] + 1.0 / fps
            boundary = math.ceil((previous[1] + t) / 2 * out_fps - _EPS)
            hand_on(max(0, boundary - first_slot))
            first_slot = max(first_slot, boundary)
        if from_output:
            work = to_output.reformat(frame, out_w, out_h, "yuv420p", interpolation=area,
                                      threads=1)
        else:
            work = to_analysis.reformat(frame, an_w, an_h, "yuv420p", interpolation=area,
                                        threads=1)
        # The decoded frame itself is only kept when the output needs a second scaling.
        previous = (index, t, work if from_output else frame, work)

    if previous is None:
        raise AnalysisError("the video stream yields no decodable frame")
    end_t = previous[1] + 1.0 / fps
    hand_on(max(0, math.ceil(end_t * out_fps - _EPS) - first_slot))
    run.feed(batch)
    run.close_scene(index + 1, end_t)
