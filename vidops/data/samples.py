"""Deterministic sample video corpora built only from installed packages.

The corpora exist so that the whole platform (curation, training, evaluation) can run end to
end without downloading data, and so that tests can check behaviour against known ground truth:

* ``shapes``: coloured shapes moving on black, captioned "a red circle moving left". A fixed set
  of (colour, shape, direction) combos is held out so compositional generalisation can be
  evaluated on captions the model never saw.
* ``shapes-finetune``: the same generator with one new colour (purple), for fine-tuning runs.
* ``photos``: camera pans and zooms over scikit-image's bundled photographs, some with a cut.
* ``defects``: inputs that curation must reject, one per reason code, with an
  ``expected.json`` of the reason each file should get.

Every random choice comes from generators derived from ``seed`` and the clip index, and the
encoder is run bit-exact, so the same seed gives byte-identical files and clip ``i`` does not
depend on how many clips were asked for.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
from skimage import data as skdata
from skimage import draw, filters, transform

from vidops.media.video import read_frames, write_video

SAMPLE_KINDS = ("shapes", "shapes-finetune", "photos", "defects")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
}
FINETUNE_COLOURS: dict[str, tuple[int, int, int]] = {"purple": (150, 60, 200)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")

# Each held-out combo differs from training only in how its parts are combined: every colour,
# shape and direction (and every pair of them) still occurs in training, so a model that
# generalises compositionally can render these captions without having seen them.
HOLDOUT: tuple[tuple[str, str, str], ...] = (
    ("blue", "circle", "up"),
    ("blue", "triangle", "right"),
    ("green", "square", "left"),
    ("red", "circle", "down"),
    ("red", "triangle", "left"),
    ("yellow", "square", "up"),
)
FINETUNE_HOLDOUT: tuple[tuple[str, str, str], ...] = (
    ("purple", "circle", "right"),
    ("purple", "triangle", "up"),
)

DEFECT_REASONS = (
    "duplicate",
    "unreadable",
    "too_small",
    "too_short",
    "blurry",
    "static",
    "near_duplicate",
)

# Photographs bundled with scikit-image (no network needed). `cat` is omitted because it is the
# same image as `chelsea`. Keys are file-name safe (no underscores: they separate name fields).
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("astronaut", "an astronaut"),
    "chelsea": ("chelsea", "a cat"),
    "coffee": ("coffee", "a cup of coffee"),
    "rocket": ("rocket", "a rocket on its launch pad"),
    "hubble-deep-field": ("hubble_deep_field", "distant galaxies"),
    "immunohistochemistry": ("immunohistochemistry", "stained tissue under a microscope"),
    "colorwheel": ("colorwheel", "a colour wheel"),
}
MOTIONS = ("pan-left", "pan-right", "pan-up", "pan-down", "zoom-in", "zoom-out")
_PAN_WORDS = {
    "pan-left": "to the left",
    "pan-right": "to the right",
    "pan-up": "upwards",
    "pan-down": "downwards",
}

_DEFAULT_COUNTS = {"shapes": 48, "shapes-finetune": 12, "photos": 8}

SHAPES_SIZE = 128
SHAPES_FPS = 24
SHAPES_FRAMES = 72
# Fraction of the frame a shape travels in a clip, and the central band its lane lies in.
SHAPES_TRAVEL = (0.55, 0.62)
SHAPES_LANE = 0.3
PHOTOS_WIDTH, PHOTOS_HEIGHT = 256, 192
PHOTOS_FPS = 24

# Black border kept around the shape so that H.264's chroma subsampling and ringing cannot
# push foreground into the outermost pixels, which curation and tests read as "left frame".
_EDGE_MARGIN = 4
_ZOOM_MIN_SCALE = 0.6


@dataclass(frozen=True)
class SampleReport:
    """What `write_samples` wrote."""

    kind: str
    out_dir: Path
    files: list[Path]  # the video files written, sorted
    expected: dict[str, str]  # defects only: file name -> expected reason code; {} otherwise


def caption_for(colour: str, shape: str, direction: str) -> str:
    """Caption of a shapes clip, e.g. ``"a red circle moving left"``."""
    return f"a {colour} {shape} moving {direction}"


def training_combos(kind: str = "shapes") -> tuple[tuple[str, str, str], ...]:
    """The (colour, shape, direction) combos that `kind` generates, i.e. all minus its holdout."""
    if kind == "shapes":
        colours, holdout = COLOURS, HOLDOUT
    elif kind == "shapes-finetune":
        colours, holdout = FINETUNE_COLOURS, FINETUNE_HOLDOUT
    else:
        raise ValueError(f"kind {kind!r} has no shape combos; use 'shapes' or 'shapes-finetune'")
    held = set(holdout)
    return tuple(c for c in product(colours, SHAPES, DIRECTIONS) if c not in held)


def write_samples(
    out_dir: Path, kind: str, count: int | None = None, seed: int = 0
) -> SampleReport:
    """Write a deterministic sample corpus of `kind` into `out_dir` (created if missing).

    `count` defaults to 48 (shapes), 12 (shapes-finetune) or 8 (photos) and is ignored for
    ``defects``, which is a fixed set. Existing files with the same names are replaced; other
    files in `out_dir` are left alone.
    """
    if kind not in SAMPLE_KINDS:
        raise ValueError(f"unknown sample kind {kind!r}; expected one of {', '.join(SAMPLE_KINDS)}")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"count must be a positive integer, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "defects":
        return _write_defects(out_dir, seed)
    n = count if count is not None else _DEFAULT_COUNTS[kind]
    if kind == "photos":
        return _write_photos(out_dir, n, seed)
    return _write_shapes(out_dir, kind, n, seed)


# --------------------------------------------------------------------------------------------
# Shared helpers


def _rng(seed: int, stream: str, *index: int) -> np.random.Generator:
    """A generator for one named purpose and index, independent of every other one.

    crc32 rather than hash(): str hashes are salted per process and would break reproducibility.
    """
    tag = zlib.crc32(stream.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(tag, *index)))


def _write_clip(path: Path, frames: Iterable[np.ndarray], fps: float, crf: int = 18) -> None:
    # Encode beside the target and rename, so an interrupted run never leaves a half-written
    # file under a real clip name (it would look like an "unreadable" defect to curation).
    tmp = path.with_name(f".partial-{path.name}")
    try:
        write_video(tmp, frames, fps, crf=crf)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_caption(video: Path, caption: str) -> None:
    video.with_suffix(".txt").write_text(caption, encoding="utf-8")


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] to uint8, rounding rather than truncating."""
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# shapes / shapes-finetune


@dataclass(frozen=True)
class _ShapeClip:
    colour: str
    shape: str
    direction: str
    size: int  # extent of the shape's bounding box, px
    start: tuple[float, float]  # centre (x, y) at the first frame
    displacement: float  # px moved between the first and the last frame
    width: int
    height: int
    frames: int

    @property
    def caption(self) -> str:
        return caption_for(self.colour, self.shape, self.direction)

    @property
    def rgb(self) -> tuple[int, int, int]:
        return {**COLOURS, **FINETUNE_COLOURS}[self.colour]


_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _shape_clip(
    rng: np.random.Generator,
    combo: tuple[str, str, str],
    *,
    width: int = SHAPES_SIZE,
    height: int = SHAPES_SIZE,
    frames: int = SHAPES_FRAMES,
    size_range: tuple[int, int] = (26, 36),
    margin: int = _EDGE_MARGIN,
) -> _ShapeClip:
    """Random size, lane and start for one clip, chosen so the shape stays inside the frame.

    A shape crosses most of the frame (SHAPES_TRAVEL of it) from the side its caption implies,
    in a lane near the middle (SHAPES_LANE): "moving left" then says where the shape is in
    every frame, not only how it moves. With starts and lanes anywhere, a caption's direction
    explained about 5 % of the pixel variance of its clips (colour 6 %) and the demo model
    never learned it; crossing the frame near the middle it explains about 18 %.
    """
    colour, shape, direction = combo
    size = int(rng.integers(size_range[0], size_range[1] + 1))
    dx, dy = _STEP[direction]
    axis_len = width if dx else height
    displacement = float(rng.uniform(*SHAPES_TRAVEL)) * axis_len
    # +1: rasterising a shape centred at c with extent `size` can touch pixel c +/- size/2.
    half = size / 2 + 1 + margin
    centre = []
    for step, length in ((dx, width), (dy, height)):
        lo, hi = half, length - half
        if step > 0:
            hi -= displacement
        elif step < 0:
            lo += displacement
        else:
            lo = max(lo, length * (1 - SHAPES_LANE) / 2)
            hi = min(hi, length * (1 + SHAPES_LANE) / 2)
        if hi < lo:
            raise ValueError(
                f"a {size}px shape moving {displacement:.0f}px does not fit {length}px"
            )
        centre.append(float(rng.uniform(lo, hi)))
    return _ShapeClip(
        colour, shape, direction, size, (centre[0], centre[1]), displacement, width, height, frames
    )


def _shape_mask(shape: str, cx: float, cy: float, size: int, dims: tuple[int, int]) -> tuple:
    r = size / 2
    if shape == "circle":
        # Diameter of the rasterised disk is `size` (radius counts the centre pixel).
        return draw.disk((cy, cx), (size - 1) / 2, shape=dims)
    if shape == "square":
        rows = np.array([cy - r, cy - r, cy + r, cy + r])
        cols = np.array([cx - r, cx + r, cx + r, cx - r])
    elif shape == "triangle":
        rows = np.array([cy - r, cy + r, cy + r])
        cols = np.array([cx, cx + r, cx - r])
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return draw.polygon(rows, cols, shape=dims)


def _shape_frames(clip: _ShapeClip) -> Iterator[np.ndarray]:
    dx, dy = _STEP[clip.direction]
    dims = (clip.height, clip.width)
    rgb = np.array(clip.rgb, dtype=np.uint8)
    for t in range(clip.frames):
        offset = clip.displacement * t / max(clip.frames - 1, 1)
        cx = clip.start[0] + dx * offset
        cy = clip.start[1] + dy * offset
        frame = np.zeros((*dims, 3), dtype=np.uint8)
        frame[_shape_mask(clip.shape, cx, cy, clip.size, dims)] = rgb
        yield frame


def _plan_shapes(kind: str, count: int, seed: int) -> list[_ShapeClip]:
    """Clip parameters for `count` clips: combos cycle in a fresh seeded order per cycle."""
    combos = training_combos(kind)
    plan = []
    for i in range(count):
        cycle, pos = divmod(i, len(combos))
        order = _rng(seed, f"{kind}/order", cycle).permutation(len(combos))
        plan.append(_shape_clip(_rng(seed, f"{kind}/clip", i), combos[order[pos]]))
    return plan


def _write_shapes(out_dir: Path, kind: str, count: int, seed: int) -> SampleReport:
    prefix, holdout = ("shapes", HOLDOUT) if kind == "shapes" else ("finetune", FINETUNE_HOLDOUT)
    files = []
    for i, clip in enumerate(_plan_shapes(kind, count, seed)):
        # Every fifth clip in Matroska so consumers are exercised on more than one container.
        suffix = ".mkv" if i % 5 == 4 else ".mp4"
        path = out_dir / f"{prefix}_{i:04d}_{clip.colour}_{clip.shape}_{clip.direction}{suffix}"
        _write_clip(path, _shape_frames(clip), SHAPES_FPS)
        _write_caption(path, clip.caption)
        files.append(path)
    captions = sorted(caption_for(*combo) for combo in holdout)
    (out_dir / "holdout.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    return SampleReport(kind=kind, out_dir=out_dir, files=sorted(files), expected={})


# --------------------------------------------------------------------------------------------
# photos


@dataclass(frozen=True)
class _Segment:
    """One camera move over one photograph.

    Pans: the window is `scale` of the largest one that can travel `amount` of the image, sits
    at `across` (0..1) of the free room across the pan axis and starts at `along` (0..1) of the
    room left over along it. Zooms: the tight window sits at (`across`, `along`) inside the
    full one and `amount` is the change of scale.
    """

    photo: str
    motion: str
    frames: int
    amount: float
    scale: float
    across: float
    along: float

    def caption(self) -> str:
        seconds = self.frames / PHOTOS_FPS
        speed = "slow" if self.amount / seconds < 0.15 else "quick"
        subject = f"a photograph of {PHOTOS[self.photo][1]}"
        if self.motion == "zoom-in":
            return f"a {speed} zoom into {subject}"
        if self.motion == "zoom-out":
            return f"a {speed} zoom out from {subject}"
        return f"a {speed} pan {_PAN_WORDS[self.motion]} across {subject}"


def _segment(rng: np.random.Generator, photo: str, motion: str, frames: int) -> _Segment:
    if motion.startswith("pan"):
        amount, scale = float(rng.uniform(0.20, 0.40)), float(rng.uniform(0.85, 1.0))
    else:
        amount, scale = 1.0 - _ZOOM_MIN_SCALE, 1.0
    across, along = (float(v) for v in rng.uniform(0.0, 1.0, size=2))
    return _Segment(photo, motion, frames, amount, scale, across, along)


def _windows(seg: _Segment, img_h: int, img_w: int) -> Iterator[tuple[float, float, float, float]]:
    """Crop windows (x, y, w, h) in image pixels, one per frame, all with the output's aspect."""
    aspect = PHOTOS_WIDTH / PHOTOS_HEIGHT
    ts = np.linspace(0.0, 1.0, seg.frames)
    if seg.motion.startswith("pan"):
        horizontal = seg.motion in ("pan-left", "pan-right")
        # Window small enough that it can travel `amount` of the image along the pan axis.
        if horizontal:
            w = min(img_w * (1 - seg.amount), img_h * aspect) * seg.scale
            h = w / aspect
            travel, slack = img_w * seg.amount, img_w - w - img_w * seg.amount
            across = (img_h - h) * seg.across
        else:
            h = min(img_h * (1 - seg.amount), img_w / aspect) * seg.scale
            w = h * aspect
            travel, slack = img_h * seg.amount, img_h - h - img_h * seg.amount
            across = (img_w - w) * seg.across
        start = slack * seg.along
        forward = seg.motion in ("pan-right", "pan-down")
        for t in ts:
            along = start + travel * (t if forward else 1 - t)
            yield (along, across, w, h) if horizontal else (across, along, w, h)
        return
    # Zoom between the largest centred window and a tight window inside it: both ends lie
    # inside the image, and so does every linear blend of them.
    full_w = min(img_w, img_h * aspect)
    full_h = full_w / aspect
    full_x, full_y = (img_w - full_w) / 2, (img_h - full_h) / 2
    tight_w, tight_h = full_w * _ZOOM_MIN_SCALE, full_h * _ZOOM_MIN_SCALE
    tight_x = full_x + (full_w - tight_w) * seg.across
    tight_y = full_y + (full_h - tight_h) * seg.along
    for t in ts:
        s = t if seg.motion == "zoom-in" else 1 - t
        yield (
            full_x + (tight_x - full_x) * s,
            full_y + (tight_y - full_y) * s,
            full_w + (tight_w - full_w) * s,
            full_h + (tight_h - full_h) * s,
        )


def _load_photo(name: str, cache: dict[str, np.ndarray]) -> np.ndarray:
    if name not in cache:
        cache[name] = np.ascontiguousarray(getattr(skdata, PHOTOS[name][0])()[..., :3])
    return cache[name]


def _segment_frames(seg: _Segment, cache: dict[str, np.ndarray]) -> Iterator[np.ndarray]:
    image = _load_photo(seg.photo, cache)
    img_h, img_w = image.shape[:2]
    windows = list(_windows(seg, img_h, img_w))
    # Shrink the photograph once so that the smallest window is still at least output size:
    # the per-frame resize then works on a few output-sized crops instead of megapixel ones,
    # which is most of the generation time, at no visible cost.
    factor = min(w for _, _, w, _ in windows) / PHOTOS_WIDTH
    if factor > 1.25:
        small_h, small_w = round(img_h / factor), round(img_w / factor)
        image = transform.resize(image, (small_h, small_w), anti_aliasing=True).astype(np.float32)
        sx, sy = small_w / img_w, small_h / img_h
        windows = [(x * sx, y * sy, w * sx, h * sy) for x, y, w, h in windows]
        img_h, img_w = small_h, small_w
    else:
        image = image.astype(np.float32) / 255.0
    for x, y, w, h in windows:
        x0, y0 = round(x), round(y)
        x1, y1 = min(max(round(x + w), x0 + 1), img_w), min(max(round(y + h), y0 + 1), img_h)
        crop = image[y0:y1, x0:x1]
        out = transform.resize(crop, (PHOTOS_HEIGHT, PHOTOS_WIDTH), anti_aliasing=True)
        yield _to_uint8(out)


def _plan_photos(count: int, seed: int) -> list[list[_Segment]]:
    """One list of segments per clip; about every third clip has two, joined by a hard cut."""
    names = list(PHOTOS)
    plan = []
    for i in range(count):
        cycle, pos = divmod(i, len(names))
        photo = names[_rng(seed, "photos/order", cycle).permutation(len(names))[pos]]
        # Motions cycle in a fixed order so that any few consecutive clips mix pans and zooms.
        motion = MOTIONS[i % len(MOTIONS)]
        rng = _rng(seed, "photos/clip", i)
        frames = int(rng.integers(2 * PHOTOS_FPS, 4 * PHOTOS_FPS + 1))
        if i % 3 == 2:
            first = frames // 2
            other = names[(names.index(photo) + int(rng.integers(1, len(names)))) % len(names)]
            other_motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
            plan.append(
                [
                    _segment(rng, photo, motion, first),
                    _segment(rng, other, other_motion, frames - first),
                ]
            )
        else:
            plan.append([_segment(rng, photo, motion, frames)])
    return plan


def _photo_clip_frames(
    segments: list[_Segment], cache: dict[str, np.ndarray]
) -> Iterator[np.ndarray]:
    for seg in segments:
        yield from _segment_frames(seg, cache)


def _write_photos(out_dir: Path, count: int, seed: int) -> SampleReport:
    cache: dict[str, np.ndarray] = {}
    files = []
    for i, segments in enumerate(_plan_photos(count, seed)):
        motion = "-cut-".join(seg.motion for seg in segments)
        # Every fourth clip in QuickTime, a different container from the rest.
        suffix = ".mov" if i % 4 == 3 else ".mp4"
        path = out_dir / f"photos_{i:04d}_{segments[0].photo}_{motion}{suffix}"
        _write_clip(path, _photo_clip_frames(segments, cache), PHOTOS_FPS)
        _write_caption(path, ", then a cut to ".join(seg.caption() for seg in segments))
        files.append(path)
    return SampleReport(kind="photos", out_dir=out_dir, files=sorted(files), expected={})


# --------------------------------------------------------------------------------------------
# defects


def _write_defects(out_dir: Path, seed: int) -> SampleReport:
    rng = _rng(seed, "defects/plan")
    combos = training_combos("shapes")
    picks = rng.choice(len(combos), size=2, replace=False)
    good_a, broken = (
        _shape_clip(_rng(seed, "defects/clip", k), combos[int(j)]) for k, j in enumerate(picks)
    )
    cache: dict[str, np.ndarray] = {}
    # Detailed photographs only: the colour wheel or the mostly black Hubble field would make
    # `static` look blurry too, and each defect should trip exactly one check.
    names = ["astronaut", "chelsea", "coffee", "rocket"]
    photo_a, photo_b, photo_c = (
        names[int(k)] for k in rng.choice(len(names), size=3, replace=False)
    )
    # good_b is a pan at 256x192, so its near duplicate can be smaller and still pass the
    # minimum-size gate (128 px): it must be rejected for being a near copy, nothing else.
    good_b = _segment(_rng(seed, "defects/good_b"), photo_c, "pan-left", 3 * PHOTOS_FPS)
    expected: dict[str, str] = {}

    def emit(
        name: str,
        frames: Iterable[np.ndarray],
        caption: str,
        reason: str,
        fps: float = SHAPES_FPS,
        crf: int = 18,
    ) -> Path:
        path = out_dir / name
        _write_clip(path, frames, fps, crf=crf)
        # Every video gets a caption so that its only fault is the one it is named after.
        _write_caption(path, caption)
        expected[name] = reason
        return path

    path_a = emit("good_a.mp4", _shape_frames(good_a), good_a.caption, "")
    path_b = emit("good_b.mp4", _segment_frames(good_b, cache), good_b.caption(), "",
                  fps=PHOTOS_FPS)

    (out_dir / "duplicate.mp4").write_bytes(path_a.read_bytes())
    _write_caption(out_dir / "duplicate.mp4", good_a.caption)
    expected["duplicate.mp4"] = "duplicate"

    # MP4 keeps its index (moov) at the end, so a file cut short cannot be opened at all, the
    # usual result of an interrupted upload or copy.
    whole = emit("unreadable.mp4", _shape_frames(broken), broken.caption, "unreadable")
    data = whole.read_bytes()
    whole.write_bytes(data[: int(len(data) * 0.4)])

    small_combo = (good_a.colour, good_a.shape, good_a.direction)
    small = _shape_clip(
        _rng(seed, "defects/too_small"),
        small_combo,
        width=64,
        height=48,
        frames=2 * SHAPES_FPS,
        size_range=(8, 10),
        margin=2,
    )
    emit("too_small.mp4", _shape_frames(small), small.caption, "too_small")

    short = _shape_clip(
        _rng(seed, "defects/too_short"), (broken.colour, broken.shape, broken.direction),
        frames=10,
    )
    emit("too_short.mp4", _shape_frames(short), short.caption, "too_short")

    pan = _segment(_rng(seed, "defects/blurry"), photo_a, "pan-right", 3 * PHOTOS_FPS)
    blurred = (
        _to_uint8(filters.gaussian(f.astype(np.float64) / 255.0, sigma=6, channel_axis=-1))
        for f in _segment_frames(pan, cache)
    )
    emit("blurry.mp4", blurred, pan.caption(), "blurry", fps=PHOTOS_FPS)

    # The first frame of a zoom in is the whole photograph at the output size.
    still_seg = _segment(_rng(seed, "defects/static"), photo_b, "zoom-in", 1)
    still = next(_segment_frames(still_seg, cache))
    emit(
        "static.mp4",
        (still for _ in range(3 * PHOTOS_FPS)),
        f"a still photograph of {PHOTOS[photo_b][1]}",
        "static",
        fps=PHOTOS_FPS,
    )

    shrunk = (
        _to_uint8(transform.resize(f, (128, 170), anti_aliasing=True)) for f in read_frames(path_b)
    )
    emit("near_duplicate.mp4", shrunk, good_b.caption(), "near_duplicate", fps=PHOTOS_FPS,
         crf=35)

    expected = dict(sorted(expected.items()))
    (out_dir / "expected.json").write_text(
        json.dumps(expected, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    files = sorted(out_dir / name for name in expected)
    return SampleReport(kind="defects", out_dir=out_dir, files=files, expected=expected)
