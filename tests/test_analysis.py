"""The one-pass video analysis: decisions, cuts, clip splitting, normalised output, hashes.

Calibration is checked on the sample corpora (seeds 0 and 1) and on constructed cases that sit
near the thresholds: a slow zoom (barely moving), a zoom into a Mandelbrot set (all detail,
all change), a portrait clip, three photographs joined by hard cuts, a long scene.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from skimage import data as skdata

from vidops.config import load_config
from vidops.data.samples import write_samples
from vidops.media.analysis import (
    AnalysisError,
    AnalysisSettings,
    ClipResult,
    VideoAnalysis,
    analyse_video,
    motion_score,
    phash,
    phash_distance,
    sharpness_score,
    thumbnail_distance,
)
from vidops.media.video import read_frames, write_video
from vidops.stages.filter import analysis_settings

SETTINGS = analysis_settings(load_config())  # the defaults of params.yaml
CUT_TOLERANCE = 3  # frames
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov")


# ------------------------------------------------------------------------------------------
# Constructed videos


def _photo(name: str) -> np.ndarray:
    return np.ascontiguousarray(getattr(skdata, name)()[..., :3])


def _camera(image: np.ndarray, windows: list[tuple[float, float, float, float]], width: int,
            height: int) -> list[np.ndarray]:
    """Frames showing crop windows (x, y, w, h) of `image`, sub-pixel accurate."""
    frames = []
    for x, y, w, h in windows:
        matrix = np.array([[w / width, 0, x], [0, h / height, y]], dtype=np.float64)
        frames.append(cv2.warpAffine(image, matrix, (width, height),
                                     flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                     borderMode=cv2.BORDER_REFLECT))
    return frames


def _zoom(image: np.ndarray, frames: int, start: float, end: float, width: int,
          height: int) -> list[np.ndarray]:
    ih, iw = image.shape[:2]
    full_w = min(iw, ih * width / height)
    full_h = full_w * height / width
    windows = []
    for t in np.linspace(0, 1, frames):
        scale = start + (end - start) * t
        w, h = full_w * scale, full_h * scale
        windows.append(((iw - w) / 2, (ih - h) / 2, w, h))
    return _camera(image, windows, width, height)


def _pan(image: np.ndarray, frames: int, travel: float, width: int, height: int,
         scale: float = 0.7) -> list[np.ndarray]:
    """A horizontal pan over `travel` of the free room, the window `scale` of the largest."""
    ih, iw = image.shape[:2]
    w = min(iw, ih * width / height) * scale
    h = w * height / width
    room = iw - w
    windows = [(room * (0.5 - travel / 2 + travel * t), (ih - h) / 2, w, h)
               for t in np.linspace(0, 1, frames)]
    return _camera(image, windows, width, height)


def _mandelbrot_zoom(frames: int, size: int = 256, zoom: float = 3.0,
                     iterations: int = 40) -> list[np.ndarray]:
    """A colour Mandelbrot zoom into the seahorse valley, rendered with numpy."""
    cx, cy = -0.7435, 0.1314
    out = []
    for t in np.linspace(0, 1, frames):
        half = 0.12 / zoom**t
        axis = np.linspace(-half, half, size)
        c = (cx + axis)[None, :] + 1j * (cy + axis)[:, None]
        z = np.zeros_like(c)
        count = np.zeros(c.shape, np.float32)
        alive = np.ones(c.shape, bool)
        for k in range(iterations):
            z[alive] = z[alive] ** 2 + c[alive]
            escaped = alive & (np.abs(z) > 2)
            count[escaped] = k
            alive &= ~escaped
        v = count / iterations
        rgb = np.stack([np.sin(6 * v + phase) * 0.5 + 0.5 for phase in (0, 2, 4)], axis=-1)
        rgb[alive] = 0
        out.append((rgb * 255).astype(np.uint8))
    return out


def _write(path: Path, frames: list[np.ndarray], fps: float = 24, crf: int = 18) -> Path:
    write_video(path, frames, fps, crf=crf)
    return path


def _true_cuts(path: Path, count: int) -> list[int]:
    """Ground truth independent of the detector: the `count` frames that differ most from
    the one before them (hard cuts between different photographs)."""
    frames = [f.astype(np.int16) for f in read_frames(path)]
    diffs = [np.abs(b - a).mean() for a, b in itertools.pairwise(frames)]
    return sorted(int(i) + 1 for i in np.argsort(diffs)[-count:])


def _decode_back(path: Path) -> tuple[int, float, int, int, str, int]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return (frames, float(stream.average_rate), stream.codec_context.width,
                stream.codec_context.height, stream.codec_context.name,
                len(container.streams.audio))


def _analyse(path: Path, out_dir: Path, settings: AnalysisSettings = SETTINGS
             ) -> VideoAnalysis:
    return analyse_video(path, out_dir, path.stem, settings)


def _assert_cuts(found: tuple[int, ...], truth: list[int]) -> None:
    assert len(found) == len(truth), (found, truth)
    for cut, true in zip(found, truth, strict=True):
        assert abs(cut - true) <= CUT_TOLERANCE, (found, truth)


def _assert_consistent(result: VideoAnalysis) -> None:
    """Clips tile the video without gaps, and the files exist exactly for kept clips."""
    assert result.clips[0].start_frame == 0
    assert result.clips[-1].end_frame == result.frames_decoded
    for a, b in itertools.pairwise(result.clips):
        assert a.end_frame == b.start_frame
    for clip in result.clips:
        if clip.reason is None:
            assert clip.path is not None and clip.path.is_file()
            assert clip.frames > 0 and clip.width % 2 == 0 and clip.height % 2 == 0
        else:
            assert clip.path is None and clip.frames == 0 and clip.width == 0


# ------------------------------------------------------------------------------------------
# Sample corpora (seeds 0 and 1)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpora")
    dirs = {}
    for seed in (0, 1):
        for kind, count in (("shapes", 24), ("photos", None), ("defects", None)):
            dirs[f"{kind}{seed}"] = write_samples(root / f"{kind}{seed}", kind, count,
                                                  seed).out_dir
    return dirs


def _videos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in VIDEO_SUFFIXES)


@pytest.mark.parametrize("seed", [0, 1])
def test_every_shapes_clip_is_kept_whole(corpora: dict[str, Path], tmp_path: Path,
                                         seed: int) -> None:
    for video in _videos(corpora[f"shapes{seed}"]):
        result = _analyse(video, tmp_path)
        _assert_consistent(result)
        assert result.cuts == (), video.name
        assert [c.reason for c in result.clips] == [None], (video.name, result.clips)
        clip = result.clips[0]
        assert (clip.width, clip.height, clip.frames) == (128, 128, 72)


@pytest.mark.parametrize("seed", [0, 1])
def test_every_photos_piece_is_kept_and_cut_clips_split_at_the_cut(
        corpora: dict[str, Path], tmp_path: Path, seed: int) -> None:
    videos = _videos(corpora[f"photos{seed}"])
    assert sum("-cut-" in v.name for v in videos) >= 2
    for video in videos:
        result = _analyse(video, tmp_path)
        _assert_consistent(result)
        assert all(c.reason is None for c in result.clips), (video.name, result.clips)
        if "-cut-" in video.name:
            _assert_cuts(result.cuts, _true_cuts(video, 1))
            assert [c.scene_index for c in result.clips] == [0, 1]
        else:
            assert result.cuts == () and len(result.clips) == 1, video.name


@pytest.mark.parametrize("seed", [0, 1])
def test_defects_get_their_reason(corpora: dict[str, Path], tmp_path: Path,
                                  seed: int) -> None:
    folder = corpora[f"defects{seed}"]
    expected = json.loads((folder / "expected.json").read_text())
    reasons = {}
    for name in ("blurry.mp4", "static.mp4", "too_short.mp4", "good_a.mp4", "good_b.mp4"):
        out_dir = tmp_path / name
        result = _analyse(folder / name, out_dir)
        _assert_consistent(result)
        assert len(result.clips) == 1, (name, result.clips)
        reasons[name] = result.clips[0].reason
        # Nothing is written for a rejected clip.
        written = sorted(p.name for p in out_dir.iterdir())
        assert written == ([] if reasons[name] else [f"{Path(name).stem}_000.mp4"])
    assert reasons == {
        "blurry.mp4": "blurry", "static.mp4": "static", "too_short.mp4": "too_short",
        "good_a.mp4": None, "good_b.mp4": None,
    }
    assert {expected[n] for n in ("blurry.mp4", "static.mp4", "too_short.mp4")} == {
        "blurry", "static", "too_short"}
    with pytest.raises(AnalysisError):
        _analyse(folder / "unreadable.mp4", tmp_path / "unreadable")


@pytest.mark.parametrize("seed", [0, 1])
def test_near_duplicates_match_and_distinct_shape_clips_do_not(
        corpora: dict[str, Path], tmp_path: Path, seed: int) -> None:
    limits = load_config().filter
    defects = corpora[f"defects{seed}"]
    good, near = (_analyse(defects / n, tmp_path).clips[0]
                  for n in ("good_b.mp4", "near_duplicate.mp4"))

    def distances(a: ClipResult, b: ClipResult) -> tuple[int, float]:
        return (max(phash_distance(x, y) for x, y in zip(a.phashes, b.phashes, strict=True)),
                max(thumbnail_distance(x, y)
                    for x, y in zip(a.thumbnails, b.thumbnails, strict=True)))

    bits, gap = distances(good, near)
    assert bits <= limits.phash_distance and gap <= limits.thumbnail_distance
    # A small shape on black: the grey hashes of distinct clips come close, the colour
    # thumbnails keep every pair of the corpus apart (and the mean colour tells colours).
    clips = {v.stem: _analyse(v, tmp_path).clips[0] for v in _videos(corpora[f"shapes{seed}"])}
    for (name_a, a), (name_b, b) in itertools.combinations(clips.items(), 2):
        bits, gap = distances(a, b)
        assert bits > limits.phash_distance or gap > 1.5 * limits.thumbnail_distance, (
            name_a, name_b, bits, gap)
    channel = {"red": 0, "green": 1, "blue": 2}
    for name, clip in clips.items():
        colour = name.split("_")[2]
        if colour in channel:
            assert int(np.argmax(clip.mean_rgb)) == channel[colour], (name, clip.mean_rgb)


# ------------------------------------------------------------------------------------------
# Constructed cases


def test_slow_zoom_over_a_photo_is_kept(tmp_path: Path) -> None:
    # 1.0 -> 0.85 of the frame over 4 s: the slowest camera move a clip should survive with.
    video = _write(tmp_path / "slow.mp4", _zoom(_photo("astronaut"), 96, 1.0, 0.85, 256, 192))
    result = _analyse(video, tmp_path / "out")
    assert result.cuts == ()
    assert [c.reason for c in result.clips] == [None]
    assert result.clips[0].motion > 2 * SETTINGS.static_threshold


def test_fractal_zoom_is_kept_as_one_scene(tmp_path: Path) -> None:
    video = _write(tmp_path / "fractal.mp4", _mandelbrot_zoom(72))
    result = _analyse(video, tmp_path / "out")
    assert result.cuts == ()
    assert [c.reason for c in result.clips] == [None]
    assert result.clips[0].sharpness > 2 * SETTINGS.blurry_threshold


def test_portrait_clip_keeps_its_aspect_ratio(tmp_path: Path) -> None:
    frames = _pan(_photo("coffee"), 48, 0.4, 192, 320, scale=0.9)
    video = _write(tmp_path / "portrait.mp4", frames)
    settings = dataclasses.replace(SETTINGS, out_short_side=128)
    result = _analyse(video, tmp_path / "out", settings)
    [clip] = result.clips
    assert clip.reason is None and clip.path is not None
    assert (clip.width, clip.height) == (128, 214)  # 320 * 128 / 192 = 213.3 -> even
    assert _decode_back(clip.path) == (48, 24.0, 128, 214, "h264", 0)


def test_three_photo_scenes_split_at_the_hard_cuts(tmp_path: Path) -> None:
    frames = (_pan(_photo("chelsea"), 48, 0.3, 256, 192)
              + _zoom(_photo("rocket"), 40, 1.0, 0.75, 256, 192)
              + _pan(_photo("astronaut"), 56, 0.3, 256, 192))
    video = _write(tmp_path / "three.mp4", frames)
    result = _analyse(video, tmp_path / "out")
    _assert_consistent(result)
    _assert_cuts(result.cuts, [48, 88])
    assert [(c.scene_index, c.reason) for c in result.clips] == [(0, None), (1, None),
                                                                 (2, None)]
    for clip, start in zip(result.clips, (0, 48, 88), strict=True):
        assert abs(clip.start_frame - start) <= CUT_TOLERANCE
        assert clip.start_s == pytest.approx(clip.start_frame / 24, abs=1e-3)
    # Each clip decodes back to exactly its frames, at the output rate.
    for clip in result.clips:
        assert clip.path is not None
        frames_back, fps_back, *_ = _decode_back(clip.path)
        assert (frames_back, fps_back) == (clip.end_frame - clip.start_frame, 24.0)
        assert clip.frames == frames_back


def test_long_scene_is_split_into_pieces_of_at_most_max_clip_s(tmp_path: Path) -> None:
    video = _write(tmp_path / "long.mp4", _pan(_photo("astronaut"), 144, 0.6, 256, 192, 0.6))
    settings = dataclasses.replace(SETTINGS, max_clip_s=2.5)
    result = _analyse(video, tmp_path / "out", settings)
    _assert_consistent(result)
    assert result.cuts == ()
    assert len(result.clips) == 3
    assert all(c.reason is None and c.scene_index == 0 for c in result.clips)
    assert all(c.end_s - c.start_s <= 2.5 + 1e-6 for c in result.clips)
    assert sum(c.frames for c in result.clips) == 144
    assert [c.clip_index for c in result.clips] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "long_000.mp4", "long_001.mp4", "long_002.mp4"]


def test_short_tail_is_merged_into_the_last_piece(tmp_path: Path) -> None:
    # 5.5 s with pieces of at most 2.5 s: 2.5 + 2.5 + 0.5 would lose the tail as too short;
    # the last two are split evenly instead (1.5 s each).
    video = _write(tmp_path / "tail.mp4", _pan(_photo("coffee"), 132, 0.6, 256, 192, 0.6))
    result = _analyse(video, tmp_path / "out", dataclasses.replace(SETTINGS, max_clip_s=2.5))
    assert [c.end_frame - c.start_frame for c in result.clips] == [60, 36, 36]
    assert all(c.reason is None for c in result.clips)


def test_output_frame_rate_is_resampled_by_timestamp(tmp_path: Path) -> None:
    frames = _pan(_photo("chelsea"), 60, 0.5, 160, 128)  # 2 s at 30 fps
    video = _write(tmp_path / "thirty.mp4", frames, fps=30)
    for out_fps, expected in ((24.0, 48), (60.0, 120)):
        settings = dataclasses.replace(SETTINGS, out_fps=out_fps)
        [clip] = _analyse(video, tmp_path / f"out{out_fps:g}", settings).clips
        assert clip.reason is None and clip.path is not None
        assert clip.frames == expected
        assert _decode_back(clip.path)[:2] == (expected, out_fps)


def test_small_source_is_not_upscaled(tmp_path: Path) -> None:
    frames = _pan(_photo("rocket"), 36, 0.5, 96, 64)
    result = _analyse(_write(tmp_path / "small.mp4", frames), tmp_path / "out")
    [clip] = result.clips
    assert (clip.width, clip.height) == (96, 64)


def test_reencode_smaller_and_worse_keeps_the_hashes(tmp_path: Path) -> None:
    original = _pan(_photo("chelsea"), 48, 0.4, 256, 192)
    worse = [cv2.resize(f, (160, 120), interpolation=cv2.INTER_AREA) for f in original]
    a = _analyse(_write(tmp_path / "a.mp4", original), tmp_path / "out").clips[0]
    b = _analyse(_write(tmp_path / "b.mp4", worse, crf=38), tmp_path / "out").clips[0]
    assert all(phash_distance(x, y) <= 6 for x, y in zip(a.phashes, b.phashes, strict=True))
    assert max(thumbnail_distance(x, y) for x, y in zip(a.thumbnails, b.thumbnails,
                                                        strict=True)) < 0.06
    c = _analyse(_write(tmp_path / "c.mp4", _pan(_photo("coffee"), 48, 0.4, 256, 192)),
                 tmp_path / "out").clips[0]
    assert phash_distance(a.phash, c.phash) > 16


def test_damaged_file_that_opens_raises_and_leaves_nothing(tmp_path: Path) -> None:
    video = _write(tmp_path / "good.mp4", _pan(_photo("astronaut"), 96, 0.6, 256, 192))
    data = bytearray(video.read_bytes())
    # The index (moov) is at the end and stays intact: the file opens, then the coded
    # frames in the second half of the data are garbage.
    moov = data.rfind(b"moov")
    for i in range(len(data) // 2, moov - 16, 97):
        data[i] ^= 0x5A
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    with av.open(str(damaged)):
        pass
    out_dir = tmp_path / "out"
    with pytest.raises(AnalysisError, match=r"does not decode past frame [1-9]"):
        _analyse(damaged, out_dir)
    assert list(out_dir.iterdir()) == []


def test_not_a_video(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("not a video\n" * 50)
    with pytest.raises(AnalysisError, match="cannot open"):
        _analyse(path, tmp_path / "out")


# ------------------------------------------------------------------------------------------
# Scores and settings


def test_phash_and_distance() -> None:
    rng = np.random.default_rng(0)
    a = cv2.GaussianBlur(rng.integers(0, 255, (96, 128), dtype=np.uint8), (9, 9), 3)
    b = cv2.GaussianBlur(rng.integers(0, 255, (96, 128), dtype=np.uint8), (9, 9), 3)
    h = phash(a)
    assert len(h) == 16 and h == h.lower() and int(h, 16) >= 0
    assert phash_distance(h, h) == 0
    assert phash_distance(h, phash(cv2.resize(a, (64, 48), interpolation=cv2.INTER_AREA))) <= 4
    assert 16 < phash_distance(h, phash(b)) < 48
    assert phash_distance("0" * 16, "f" * 16) == 64


def test_sharpness_and_motion_scores() -> None:
    photo = cv2.cvtColor(_photo("astronaut"), cv2.COLOR_RGB2GRAY)
    gray = cv2.resize(photo, (64, 64), interpolation=cv2.INTER_AREA)
    blurred = cv2.GaussianBlur(gray, (0, 0), 2)
    assert sharpness_score(gray) > 0.8 > SETTINGS.blurry_threshold > sharpness_score(blurred)
    plain = np.full((64, 64), 128, np.uint8)
    assert sharpness_score(plain) == pytest.approx(1.0)  # no structure: no evidence of blur
    assert motion_score(gray, gray, 0.5) < 0.1 * SETTINGS.static_threshold
    shifted = np.roll(gray, 2, axis=1)
    assert motion_score(gray, shifted, 0.5) == pytest.approx(4.0, rel=0.35)  # 2 px in 0.5 s


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(SETTINGS, sample_fps=0)
    with pytest.raises(ValueError):
        dataclasses.replace(SETTINGS, analysis_short_side=4)
    assert Fraction(SETTINGS.out_fps) == 24


def test_batched_scene_scores_equal_pyscenedetects_own() -> None:
    from scenedetect import ContentDetector, FrameTimecode

    from vidops.media.analysis import _SceneCuts

    rng = np.random.default_rng(0)
    yuv = rng.integers(16, 236, (10, 32, 56, 3), dtype=np.uint8)
    ours = _SceneCuts(30.0, 12, 24.0)
    first, bgr_a = ours.scores(yuv[:6])
    second, bgr_b = ours.scores(yuv[6:])  # state carries over between batches
    stock = ContentDetector(threshold=30.0)
    expected = [stock._calculate_frame_score(FrameTimecode(i, 24.0), np.ascontiguousarray(f))
                for i, f in enumerate(np.concatenate([bgr_a, bgr_b]))]
    np.testing.assert_allclose(np.concatenate([first, second]), expected, atol=1e-3)
