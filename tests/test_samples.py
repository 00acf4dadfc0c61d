"""Tests for the deterministic sample corpora in vidops.data.samples."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import av
import numpy as np
import pytest
from scipy import ndimage
from skimage import color, filters, morphology

from vidops.data.samples import (
    COLOURS,
    DEFECT_REASONS,
    DIRECTIONS,
    FINETUNE_COLOURS,
    FINETUNE_HOLDOUT,
    HOLDOUT,
    SHAPES,
    caption_for,
    training_combos,
    write_samples,
)
from vidops.media.video import read_frames

# Above codec noise on the black background, below every spec colour's brightest channel.
FOREGROUND = 60


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted(directory.iterdir()) if p.is_file()}


def _combo(path: Path) -> tuple[str, str, str]:
    _, _, colour, shape, direction = path.stem.split("_")
    return colour, shape, direction


def _decode(path: Path) -> np.ndarray:
    return np.stack(list(read_frames(path)))


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels at least 3 px inside the mask, clear of the edge smear of 4:2:0 chroma."""
    return ndimage.binary_erosion(mask, structure=morphology.disk(3))


def _decode_with_pyav(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def _frame_diffs(frames: np.ndarray) -> np.ndarray:
    return np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory):
    # 42 = every training combo once, so one corpus serves coverage and per-clip checks.
    return write_samples(tmp_path_factory.mktemp("shapes"), "shapes", count=42, seed=0)


@pytest.fixture(scope="module")
def defects(tmp_path_factory: pytest.TempPathFactory):
    return write_samples(tmp_path_factory.mktemp("defects"), "defects", seed=0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory):
    return write_samples(tmp_path_factory.mktemp("photos"), "photos", count=4, seed=0)


def test_shapes_reproducible_per_seed_and_independent_of_count(shapes, tmp_path: Path) -> None:
    again = write_samples(tmp_path / "again", "shapes", count=6, seed=0)
    other = write_samples(tmp_path / "other", "shapes", count=6, seed=1)
    full = _hashes(shapes.out_dir)
    # Clip i must not depend on how many clips were asked for: the first six of the 42-clip
    # corpus are the same files, byte for byte.
    for name, digest in _hashes(again.out_dir).items():
        assert full[name] == digest, name
    other_videos = {_sha256(p) for p in other.files}
    assert other_videos.isdisjoint(_sha256(p) for p in again.files)


def test_defects_reproducible_per_seed(defects, tmp_path: Path) -> None:
    again = write_samples(tmp_path / "again", "defects", seed=0)
    assert _hashes(again.out_dir) == _hashes(defects.out_dir)
    other = write_samples(tmp_path / "other", "defects", seed=1)
    assert _sha256(other.out_dir / "good_a.mp4") != _sha256(defects.out_dir / "good_a.mp4")
    assert _sha256(other.out_dir / "blurry.mp4") != _sha256(defects.out_dir / "blurry.mp4")


def test_shapes_cover_training_combos_and_never_holdout(shapes) -> None:
    combos = [_combo(p) for p in shapes.files]
    assert len(shapes.files) == 42
    assert sorted(combos) == sorted(training_combos("shapes"))
    assert not set(combos) & set(HOLDOUT)
    assert {c for c, _, _ in combos} == set(COLOURS)
    assert {s for _, s, _ in combos} == set(SHAPES)
    assert {d for _, _, d in combos} == set(DIRECTIONS)
    suffixes = {p.suffix for p in shapes.files}
    assert suffixes == {".mp4", ".mkv"}
    assert all(p.suffix == ".mkv" for p in shapes.files if int(p.stem.split("_")[1]) % 5 == 4)


def test_shapes_sidecars_and_holdout_file(shapes) -> None:
    for path in shapes.files:
        assert path.with_suffix(".txt").read_text(encoding="utf-8") == caption_for(*_combo(path))
    lines = (shapes.out_dir / "holdout.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 6
    assert lines == sorted(caption_for(*c) for c in HOLDOUT)
    assert caption_for("red", "circle", "left") == "a red circle moving left"


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4, 9])  # 4 and 9 are .mkv
def test_shapes_clip_decodes_with_spec_colour_and_motion(shapes, index: int) -> None:
    path = shapes.files[index]
    colour, _, direction = _combo(path)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (128, 128)
        assert stream.average_rate == 24
    frames = _decode(path)
    assert frames.shape == (72, 128, 128, 3)

    masks = frames.max(axis=3) > FOREGROUND
    for t, mask in enumerate(masks):
        assert mask.sum() > 300, f"frame {t}: shape missing"
        border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        assert not border.any(), f"frame {t}: shape touches the frame edge"

    middle = frames[36]
    inner = _interior(masks[36])
    assert inner.sum() > 50
    measured = np.median(middle[inner].astype(int), axis=0)
    assert np.all(np.abs(measured - np.array(COLOURS[colour])) <= 25), measured

    def centroid(mask: np.ndarray) -> np.ndarray:
        rows, cols = np.nonzero(mask)
        return np.array([cols.mean(), rows.mean()])

    dx, dy = centroid(masks[-1]) - centroid(masks[0])
    along, across = {"left": (-dx, dy), "right": (dx, dy), "up": (-dy, dx), "down": (dy, dx)}[
        direction
    ]
    assert 0.30 * 128 <= along <= 0.65 * 128, (direction, dx, dy)
    assert abs(across) < 2
    # The caption says where the shape is: it enters from the side opposite its direction and
    # keeps to a lane near the middle of the frame (a triangle's centroid sits up to 6 px below
    # its centre).
    x0, y0 = centroid(masks[0])
    entry = {"left": x0 - 64, "right": 64 - x0, "up": y0 - 64, "down": 64 - y0}[direction]
    lane = y0 - 64 if direction in ("left", "right") else x0 - 64
    assert entry > 0.15 * 128 and abs(lane) <= 0.15 * 128 + 7, (direction, x0, y0)


def test_shapes_finetune_only_purple_with_its_holdout(tmp_path: Path) -> None:
    report = write_samples(tmp_path / "ft", "shapes-finetune", count=12, seed=0)
    assert len(report.files) == 12
    assert len(FINETUNE_HOLDOUT) >= 2
    for path in report.files:
        assert path.name.startswith("finetune_")
        colour, shape, direction = _combo(path)
        assert colour == "purple"
        assert (colour, shape, direction) not in FINETUNE_HOLDOUT
        assert path.with_suffix(".txt").read_text(encoding="utf-8") == caption_for(
            colour, shape, direction
        )
    lines = (report.out_dir / "holdout.txt").read_text(encoding="utf-8").splitlines()
    assert lines == sorted(caption_for(*c) for c in FINETUNE_HOLDOUT)
    assert {".mp4", ".mkv"} <= {p.suffix for p in report.files}
    frame = next(read_frames(report.files[0]))
    mask = _interior(frame.max(axis=2) > FOREGROUND)
    measured = np.median(frame[mask].astype(int), axis=0)
    assert np.all(np.abs(measured - np.array(FINETUNE_COLOURS["purple"])) <= 25), measured


def test_photos_decode_with_captions_and_containers(photos) -> None:
    assert len(photos.files) == 4
    assert any(p.suffix == ".mov" for p in photos.files)
    assert photos.expected == {}
    for path in photos.files:
        frames = _decode(path)
        assert frames.shape[1:] == (192, 256, 3)
        assert 48 <= len(frames) <= 96
        caption = path.with_suffix(".txt").read_text(encoding="utf-8")
        assert caption.startswith("a ") and "photograph of" in caption


def test_photos_cut_spikes_and_plain_pan_does_not(photos) -> None:
    cut = next(p for p in photos.files if "-cut-" in p.name)
    assert "then a cut to" in cut.with_suffix(".txt").read_text(encoding="utf-8")
    frames = _decode(cut)
    diffs = _frame_diffs(frames)
    spike = int(diffs.argmax())
    assert spike == len(frames) // 2 - 1  # the second half starts at frame len // 2
    assert diffs[spike] > 3 * np.delete(diffs, spike).max()

    pan = next(p for p in photos.files if "_pan-" in p.name and "-cut-" not in p.name)
    pan_diffs = _frame_diffs(_decode(pan))
    assert np.median(pan_diffs) > 0.5  # the camera really moves
    assert pan_diffs.max() < diffs[spike] / 3
    assert pan_diffs.max() < 2 * np.median(pan_diffs) + 1


def test_defects_expected_mapping(defects) -> None:
    expected = json.loads((defects.out_dir / "expected.json").read_text(encoding="utf-8"))
    assert expected == defects.expected
    assert list(expected) == sorted(expected)
    reasons = [r for r in expected.values() if r]
    assert sorted(reasons) == sorted(DEFECT_REASONS)
    assert expected["good_a.mp4"] == expected["good_b.mp4"] == ""
    assert sorted(p.name for p in defects.files) == sorted(expected)
    assert all(p.exists() for p in defects.files)


def test_defects_have_their_faults(defects) -> None:
    d = defects.out_dir
    assert (d / "duplicate.mp4").read_bytes() == (d / "good_a.mp4").read_bytes()

    with pytest.raises(av.error.FFmpegError):
        _decode_with_pyav(d / "unreadable.mp4")

    small = _decode(d / "too_small.mp4")
    assert small.shape == (48, 48, 64, 3)
    short = _decode(d / "too_short.mp4")
    assert short.shape[1:] == (128, 128, 3) and len(short) <= 12

    static = _decode(d / "static.mp4")
    assert static.shape == (72, 192, 256, 3)
    # A held still image: consecutive frames differ by codec noise only, under a grey level.
    assert _frame_diffs(static).max() < 1.0

    near = _decode(d / "near_duplicate.mp4")
    good_b = _decode(d / "good_b.mp4")
    # Smaller and lower quality than its original, yet above the minimum size (128 px),
    # so near duplication is its only fault.
    assert good_b.shape == (72, 192, 256, 3)
    assert near.shape == (72, 128, 170, 3)
    assert (d / "near_duplicate.mp4").stat().st_size < (d / "good_b.mp4").stat().st_size

    def sharpness(frame: np.ndarray) -> float:
        return float(filters.laplace(color.rgb2gray(frame)).var())

    blurry = _decode(d / "blurry.mp4")
    assert blurry.shape[1:] == (192, 256, 3)
    assert _frame_diffs(blurry).mean() > 0.5  # a pan, so it is not also static
    assert sharpness(blurry[36]) * 10 < sharpness(static[0])


def test_write_samples_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="movies"):
        write_samples(tmp_path / "x", "movies")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="count"):
        write_samples(tmp_path / "x", "shapes", count=0)
    with pytest.raises(ValueError, match="seed"):
        write_samples(tmp_path / "x", "shapes", seed=-1)
