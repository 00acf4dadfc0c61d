"""Video metrics, intervals and distances on hand-made inputs whose answers are known.

Videos are crops of a scikit-image photograph (static, flickering, panning smoothly or
jittering) and rendered shapes clips; the I3D and CLIP models are tiny stand-ins built here,
so nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy import stats
from skimage import data as skdata

from tests.conftest import TinyI3D
from vidops.data.samples import _shape_clip, _shape_frames
from vidops.evaluation.metrics import (
    VIDEO_METRICS,
    ClipScorer,
    I3DFeatures,
    frechet_distance,
    fvd,
    mean_ci,
    proportion_ci,
    vae_features,
    video_metrics,
)
from vidops.evaluation.shapes import read_shape_video

PHOTO = cv2.resize(skdata.astronaut(), (96, 96), interpolation=cv2.INTER_AREA)


def pan(xs: list[int]) -> np.ndarray:
    """64x64 crops of PHOTO whose left edge is at xs[t] in frame t."""
    return np.stack([PHOTO[16:80, x:x + 64] for x in xs])


@pytest.fixture(scope="module")
def static() -> dict[str, float]:
    return video_metrics(pan([16] * 8))


def test_metric_keys_and_directions() -> None:
    assert list(VIDEO_METRICS) == ["temporal_consistency", "sharpness", "motion",
                                   "temporal_flickering", "dynamic_degree", "motion_smoothness"]
    assert not VIDEO_METRICS["temporal_flickering"].higher_is_better
    assert all(info.label and info.description for info in VIDEO_METRICS.values())
    assert list(video_metrics(pan([16] * 3))) == list(VIDEO_METRICS)


def test_static_video(static: dict[str, float]) -> None:
    assert static["temporal_consistency"] == pytest.approx(1.0)
    assert static["motion"] == pytest.approx(0.0, abs=1e-9)
    assert static["temporal_flickering"] == 0.0
    assert static["dynamic_degree"] < 0.05
    assert static["motion_smoothness"] == pytest.approx(1.0, abs=1e-3)


def test_flickering_video(static: dict[str, float]) -> None:
    frames = pan([16] * 8).astype(np.int16)
    frames[1::2] += 40  # every other frame brighter
    flicker = video_metrics(np.clip(frames, 0, 255).astype(np.uint8))
    assert flicker["temporal_flickering"] > 20
    assert flicker["temporal_consistency"] < static["temporal_consistency"] - 0.05
    assert flicker["motion_smoothness"] < static["motion_smoothness"] - 0.05


def test_smooth_pan_against_jittery_pan(static: dict[str, float]) -> None:
    smooth = video_metrics(pan([2 * t for t in range(8)]))  # 2 px per frame
    # Steps of the same 2 px, in random directions: the camera shakes instead of panning.
    steps = np.random.default_rng(0).choice([-2, 2], size=7)
    assert len(set(steps)) == 2
    jitter = video_metrics(pan([16 + int(x) for x in np.concatenate([[0], np.cumsum(steps)])]))
    assert smooth["dynamic_degree"] == pytest.approx(2.0, abs=0.6)
    assert jitter["dynamic_degree"] == pytest.approx(2.0, abs=0.6)
    assert smooth["motion_smoothness"] > 0.9
    assert jitter["motion_smoothness"] < smooth["motion_smoothness"]
    assert smooth["motion"] > static["motion"] + 0.1


def test_blur_lowers_sharpness(static: dict[str, float]) -> None:
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 3) for f in pan([16] * 8)])
    assert video_metrics(blurred)["sharpness"] < 0.2 * static["sharpness"]


def test_shapes_video_reads_back_and_moves() -> None:
    # samples renders shapes only into files; its clip planner and frame renderer give the
    # same frames in memory, with no encoding in between.
    rng = np.random.default_rng(0)
    for combo in (("red", "circle", "right"), ("blue", "square", "up")):
        clip = _shape_clip(rng, combo, width=64, height=64, frames=8, size_range=(12, 14))
        frames = np.stack(list(_shape_frames(clip)))
        reading = read_shape_video(frames)
        assert (reading.colour, reading.shape, reading.direction) == combo
        assert video_metrics(frames)["dynamic_degree"] > 0.1


def test_video_metrics_edge_cases() -> None:
    two = video_metrics(pan([16, 18]))
    assert math.isnan(two["motion_smoothness"])
    assert two["dynamic_degree"] > 1
    tiny = video_metrics(np.stack([PHOTO[:5, :6]] * 3))  # SSIM window shrinks to fit
    assert tiny["temporal_consistency"] == pytest.approx(1.0)
    for bad in (pan([16]), pan([16] * 3).astype(np.float32), pan([16] * 3)[..., 0]):
        with pytest.raises(ValueError):
            video_metrics(bad)


def test_mean_ci() -> None:
    ci = mean_ci([1, 2, 3, 4, 5, float("nan")])
    low, high = stats.t.interval(0.95, 4, loc=3, scale=stats.sem([1, 2, 3, 4, 5]))
    assert ci["n"] == 5 and ci["mean"] == pytest.approx(3.0)
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx((low, high))
    assert ci["ci_low"] < 3 < ci["ci_high"]
    assert 3 - ci["ci_low"] == pytest.approx(ci["ci_high"] - 3)
    assert mean_ci([2.5]) == {"mean": 2.5, "ci_low": 2.5, "ci_high": 2.5, "n": 1}
    empty = mean_ci([float("nan")])
    assert empty["n"] == 0 and all(math.isnan(empty[k]) for k in ("mean", "ci_low", "ci_high"))


def test_proportion_ci() -> None:
    none = proportion_ci(0, 10)
    assert none["mean"] == 0 and none["ci_low"] == 0 and 0 < none["ci_high"] < 0.35
    every = proportion_ci(10, 10)
    assert every["ci_high"] == 1 and 0.65 < every["ci_low"] < 1
    some = proportion_ci(3, 10)
    assert some["ci_low"] < 0.3 < some["ci_high"]
    assert (some["ci_low"], some["ci_high"]) == pytest.approx((0.1078, 0.6032), abs=1e-3)
    assert math.isnan(proportion_ci(0, 0)["mean"])
    with pytest.raises(ValueError):
        proportion_ci(11, 10)


def test_frechet_distance() -> None:
    rng = np.random.default_rng(0)
    dims = 8
    a = rng.normal(size=(2000, dims))
    assert frechet_distance(a, a) < 1e-6 * dims
    b = rng.normal(size=(2000, dims))
    shifted = [frechet_distance(a, b + d) for d in (0.0, 0.5, 1.0, 2.0)]
    assert shifted == sorted(shifted)
    for d, fd in zip((0.5, 1.0, 2.0), shifted[1:], strict=True):
        assert fd == pytest.approx(dims * d * d, rel=0.1, abs=0.1)
    # Fewer samples than dimensions: singular covariances, still a finite distance.
    deficient = frechet_distance(rng.normal(size=(5, 20)), rng.normal(size=(6, 20)) + 1)
    assert math.isfinite(deficient) and deficient > 0
    with pytest.raises(ValueError):
        frechet_distance(a[:1], b)
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :3])


def test_vae_features() -> None:
    feats = vae_features(torch.randn(3, 4, 5, 6, 7))
    assert feats.shape == (3, 24) and feats.dtype == np.float64
    constant = vae_features(torch.full((2, 4, 3, 5, 5), 0.7))
    assert np.allclose(constant[:, 4:8], 0) and np.allclose(constant[:, :4], 0.7)
    halves = torch.zeros(1, 1, 2, 4, 4)
    halves[..., :2] = 1.0  # left half of the frame lit
    assert vae_features(halves)[0, 2:].tolist() == pytest.approx([1, 0, 1, 0])
    with pytest.raises(ValueError):
        vae_features(torch.zeros(2, 4, 5, 6))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_i3d_features_and_fvd(tmp_path: Path) -> None:
    path = tmp_path / "i3d.pt"
    torch.jit.script(TinyI3D()).save(str(path))
    i3d = I3DFeatures(path)
    red = np.zeros((4, 16, 16, 3), np.uint8)
    red[..., 0] = 255
    # [N, 3, F, H, W] in [-1, 1]: a pure red clip has channel means (1, -1, -1).
    assert i3d([red])[0, :3].tolist() == pytest.approx([1, -1, -1])

    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 200, (4, 16, 16, 3), dtype=np.uint8) for _ in range(10)]
    videos.append(rng.integers(0, 200, (4, 8, 8, 3), dtype=np.uint8))  # a shape of its own
    assert np.allclose(i3d(videos, batch_size=3), i3d(videos))
    assert fvd(videos, videos, i3d) == pytest.approx(0.0, abs=1e-6)
    brighter = [v + np.uint8(40) for v in videos]
    assert fvd(videos, brighter, i3d) > 0.01
    with pytest.raises(FileNotFoundError, match="i3d_torchscript"):
        I3DFeatures(tmp_path / "missing.pt")


def _tiny_clip(path: Path) -> None:
    """A random 2-layer CLIP with a byte-level BPE tokenizer (no merges) and a 32 px image
    processor, saved as a from_pretrained folder."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    chars = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    vocab = {token: i for i, token in enumerate(tokens)}
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32},
                                crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16)
    CLIPModel(config).save_pretrained(path)


def test_clip_scorer(tmp_path: Path) -> None:
    _tiny_clip(tmp_path)
    scorer = ClipScorer(str(tmp_path))
    frames = pan([2 * t for t in range(5)])
    score = scorer(frames, "an astronaut")
    assert math.isfinite(score) and 0 <= score <= 100
    assert scorer(frames, "an astronaut") == score
    # Longer than the model's 16 positions: truncated, not an error.
    long = scorer(frames, "an astronaut floating in space " * 10, max_frames=2)
    assert math.isfinite(long) and 0 <= long <= 100
