"""Annotate: captions (ingest, captioner, fallback, none), keyframes, faces and their blur,
colours, tags, and the clip files of the output."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from skimage import data as skdata

from vidops.annotation import Captioner, CaptionerError, load_captioner
from vidops.config import load_config
from vidops.data.manifest import ANNOTATE_COLUMNS, FILTER_COLUMNS, rejected_frame
from vidops.media import colours, faces
from vidops.media.video import read_frames, write_video
from vidops.stage import StageContext, StageError, StageOutcome, load_output, run_stage
from vidops.stages import annotate as annotate_stage
from vidops.stages.annotate import fallback_caption, motion_level, run_annotate
from vidops.tracking.workdir import Workdir

SIZE = 128
FPS = 24.0
RED = (220, 40, 40)
BLUE = (50, 90, 230)
WHITE = (240, 240, 240)


def red_square_frames(frames: int = 24) -> list[np.ndarray]:
    out = []
    for t in range(frames):
        frame = np.zeros((SIZE, SIZE, 3), np.uint8)
        x = 10 + 2 * t
        frame[44:88, x:x + 44] = RED
        out.append(frame)
    return out


def blue_white_frames(frames: int = 24) -> list[np.ndarray]:
    out = []
    for t in range(frames):
        frame = np.empty((SIZE, SIZE, 3), np.uint8)
        frame[:80] = BLUE
        frame[80:] = WHITE
        frame[90:100, 10 + t:20 + t] = BLUE  # a little motion, as the filter let it through
        out.append(frame)
    return out


def dark_frames(frames: int = 24) -> list[np.ndarray]:
    out = []
    for t in range(frames):
        frame = np.zeros((SIZE, SIZE, 3), np.uint8)
        frame[30:90, 20 + t:80 + t] = (20, 110, 40)
        out.append(frame)
    return out


def astronaut_frames(frames: int = 36) -> list[np.ndarray]:
    """A slow pan over a real photograph with a frontal face in it."""
    photo = skdata.astronaut()
    out = []
    for t in range(frames):
        x = round(48 * t / (frames - 1))
        crop = np.ascontiguousarray(photo[0:320, x:x + 320])
        out.append(cv2.resize(crop, (SIZE, SIZE), interpolation=cv2.INTER_AREA))
    return out


@dataclass
class ClipSpec:
    name: str
    caption: str | None
    motion: float
    frames: list[np.ndarray] = field(default_factory=list)  # none: a file that is no video

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    @property
    def clip_id(self) -> str:
        return f"{self.sha[:16]}-000000-{self.frame_count:06d}"

    @property
    def frame_count(self) -> int:
        return len(self.frames) or 24


SPECS = [
    ClipSpec("red", "a red square moving right", 2.0, red_square_frames()),
    ClipSpec("uncaptioned", None, 0.5, blue_white_frames()),
    ClipSpec("dark", None, 0.6, dark_frames()),
    ClipSpec("face", "  an astronaut in front of a flag  ", 12.0, astronaut_frames()),
    ClipSpec("broken", "a clip whose file is damaged", 0.5),
]
BY_NAME = {spec.name: spec for spec in SPECS}


def _filter_body(ctx: StageContext) -> StageOutcome:
    """Stands in for the filter stage: normalised clips and a manifest with its columns."""
    rows = []
    for spec in SPECS:
        relpath = f"clips/{spec.clip_id}.mp4"
        target = ctx.out_dir / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        if spec.frames:
            write_video(target, spec.frames, FPS)
        else:
            target.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
        n = spec.frame_count
        mean = np.mean(spec.frames, axis=(0, 1, 2)) if spec.frames else np.zeros(3)
        rows.append({
            "clip_id": spec.clip_id, "source_sha256": spec.sha,
            "source_uri": f"file:///sources/{spec.name}.mp4", "source_name": f"{spec.name}.mp4",
            "source_width": 512, "source_height": 512, "license": "CC0", "caption": spec.caption,
            "caption_origin": "sidecar" if spec.caption else None,
            "scene_index": 0, "clip_index": 0, "start_frame": 0, "end_frame": n,
            "start_s": 0.0, "end_s": n / FPS, "duration_s": n / FPS, "width": SIZE,
            "height": SIZE, "fps": FPS, "frames": n, "sharpness": 100.0,
            "motion": spec.motion, "frame_diff": 1.0, "phash": "0" * 16,
            "phashes": ",".join(["0" * 16] * 3), "mean_r": float(mean[0]),
            "mean_g": float(mean[1]), "mean_b": float(mean[2]), "path": relpath,
        })
    kept = pd.DataFrame(rows, columns=FILTER_COLUMNS)
    for column in ("caption", "caption_origin", "path", "clip_id", "source_uri"):
        kept[column] = kept[column].astype("string")
    return StageOutcome(len(rows), kept, rejected_frame([]), input_digest="test")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Workdir:
    return Workdir.at(tmp_path_factory.mktemp("annotate") / "work")


@pytest.fixture(scope="module")
def filtered(workdir: Workdir) -> Path:
    out = workdir.root.parent / "filtered"
    run_stage("filter", _filter_body, cfg=load_config("tiny"), workdir=workdir, out_dir=out,
              quiet=True)
    return out


def _annotate(filtered: Path, workdir: Workdir, name: str, overrides: list[str] | None = None,
              captioner: Captioner | None = None
              ) -> tuple[Path, pd.DataFrame, pd.DataFrame, dict]:
    cfg = load_config("tiny", overrides or [])
    out = workdir.root.parent / name
    info = run_annotate(filtered, out, cfg=cfg, workdir=workdir, quiet=True, captioner=captioner)
    manifest, on_disk = load_output(out)
    assert on_disk["counts"] == info["counts"]
    rejected = pd.read_parquet(out / "rejected.parquet")
    return out, manifest.set_index("clip_id", drop=False), rejected, info


def _middle_frame(path: Path) -> np.ndarray:
    frames = list(read_frames(path))
    return frames[len(frames) // 2]


def test_default_annotation(filtered: Path, workdir: Workdir) -> None:
    out, manifest, rejected, info = _annotate(filtered, workdir, "annotated")
    assert list(manifest.columns) == ANNOTATE_COLUMNS
    assert info["counts"] == {"input": 5, "kept": 2, "rejected": 3,
                              "by_reason": {"no_caption": 2, "unreadable": 1}}
    reasons = dict(zip(rejected["id"], rejected["reason"], strict=True))
    assert reasons == {BY_NAME["uncaptioned"].clip_id: "no_caption",
                       BY_NAME["dark"].clip_id: "no_caption",
                       BY_NAME["broken"].clip_id: "unreadable"}
    assert set(rejected["source_sha256"]) == {BY_NAME[n].sha
                                              for n in ("uncaptioned", "dark", "broken")}
    assert info["input"]["digest"].startswith("dvc-md5:")
    # Rejected clips leave no media behind.
    assert len(list((out / "clips").iterdir())) == len(list((out / "keyframes").iterdir())) == 2

    red = manifest.loc[BY_NAME["red"].clip_id]
    face = manifest.loc[BY_NAME["face"].clip_id]
    assert (red.caption, red.caption_model, red.caption_origin) == (
        "a red square moving right", "ingest", "sidecar")
    assert face.caption == "an astronaut in front of a flag"  # stripped

    for row in manifest.itertuples():
        clip, source = out / row.path, filtered / f"clips/{row.clip_id}.mp4"
        assert row.path == f"clips/{row.clip_id}.mp4" and clip.is_file()
        assert os.path.samefile(clip, source), "clips that are not re-encoded are hard links"
        assert row.keyframe == f"keyframes/{row.clip_id}.jpg"
        keyframe = cv2.imread(str(out / row.keyframe))
        assert keyframe is not None and keyframe.shape == (SIZE, SIZE, 3)
        annotators = json.loads(row.annotators)
        assert {"caption", "keyframe", "faces", "brightness", "dominant_colours",
                "motion_level", "tags"} <= set(annotators)
        assert annotators["caption"] == "ingest"
        assert annotators["faces"] == f"opencv-haar-frontalface {cv2.__version__}"
        assert not row.faces_blurred and "face_blur" not in annotators

    assert red.dominant_colours.split(",")[:2] == ["black", "red"]
    assert red.brightness < colours.DARK_BELOW and red.motion_level == "medium"
    assert red.tags == "dark,black,red,medium"
    assert red.face_count == 0
    assert face.face_count >= 1 and face.motion_level == "high"
    assert face.tags.startswith("normal,") and face.tags.endswith(",high,faces")
    assert info["annotate"]["clips_with_faces"] == 1


def test_fallback_captions_and_face_blur(filtered: Path, workdir: Workdir,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Four clips are too few for worker processes; this run goes through the pool anyway.
    monkeypatch.setattr(annotate_stage, "POOL_MIN_CLIPS", 2)
    out, manifest, rejected, info = _annotate(
        filtered, workdir, "blurred",
        ["annotate.allow_fallback_caption=true", "privacy.blur_faces=true"])
    assert info["counts"]["kept"] == 4 and list(rejected["reason"]) == ["unreadable"]

    plain = manifest.loc[BY_NAME["uncaptioned"].clip_id]
    assert plain.caption == "a video with mostly blue and white colours, little motion"
    assert (plain.caption_origin, plain.caption_model) == ("fallback", "fallback")
    assert json.loads(plain.annotators)["caption"].startswith("vidops-fallback-caption")
    assert plain.tags == "normal,blue,white,low"
    dark = manifest.loc[BY_NAME["dark"].clip_id]
    assert dark.caption == "a dark video with mostly black and green colours, little motion"

    red = manifest.loc[BY_NAME["red"].clip_id]
    assert not red.faces_blurred
    assert os.path.samefile(out / red.path, filtered / red.path)

    face = manifest.loc[BY_NAME["face"].clip_id]
    assert face.faces_blurred and face.face_count >= 1
    assert "face_blur" in json.loads(face.annotators)
    blurred_path, source_path = out / face.path, filtered / face.path
    assert not os.path.samefile(blurred_path, source_path)
    assert len(list(read_frames(blurred_path))) == len(BY_NAME["face"].frames)

    before, after = _middle_frame(source_path), _middle_frame(blurred_path)
    boxes = faces.detect_faces(before)
    assert boxes, "the face is found in the input"
    x, y, w, h = boxes[0]
    face_before = faces.laplacian_variance(before[y:y + h, x:x + w])
    face_after = faces.laplacian_variance(after[y:y + h, x:x + w])
    assert face_after < 0.1 * face_before, (face_before, face_after)
    assert not faces.detect_faces(after), "no face is recognisable after blurring"
    # Away from the padded face box the picture keeps its detail.
    rest = (slice(y + h + h // 2, SIZE), slice(0, SIZE))
    rest_before = faces.laplacian_variance(before[rest])
    rest_after = faces.laplacian_variance(after[rest])
    assert 0.7 < rest_after / rest_before < 1.3, (rest_before, rest_after)


class ListCaptioner:
    """A captioner stand-in that records what it was shown; it has nothing to say about
    dark frames."""

    name = "test/list-captioner"
    version = "7"

    def __init__(self) -> None:
        self.seen: list[list[np.ndarray]] = []

    def caption(self, frames: list[np.ndarray]) -> str:
        self.seen.append(frames)
        if np.mean(frames) < 50:
            return "  \n"
        return "   " + "a blue sky over white snow, " * 10


def test_captioner_writes_missing_captions(filtered: Path, workdir: Workdir) -> None:
    captioner = ListCaptioner()
    assert isinstance(captioner, Captioner)
    out, manifest, rejected, info = _annotate(
        filtered, workdir, "captioned", ["annotate.max_caption_chars=38"], captioner=captioner)
    assert info["counts"]["kept"] == 3

    assert len(captioner.seen) == 2, "only the clips without a caption are captioned"
    for frames in captioner.seen:
        assert len(frames) == 3 and all(f.shape == (SIZE, SIZE, 3) for f in frames)
        assert all(f.dtype == np.uint8 for f in frames)

    row = manifest.loc[BY_NAME["uncaptioned"].clip_id]
    assert row.caption == "a blue sky over white snow, a blue sky"  # stripped, cut to 38
    assert (row.caption_origin, row.caption_model) == ("captioner", "test/list-captioner")
    assert json.loads(row.annotators)["caption"] == "test/list-captioner 7"
    assert manifest.loc[BY_NAME["red"].clip_id].caption_model == "ingest"
    assert info["annotate"]["captioner"] == "test/list-captioner 7"
    assert info["annotate"]["captions_by_model"] == {"ingest": 2, "test/list-captioner": 1}

    # An empty machine caption is no caption (no fallback here): rejected, no media left.
    dark = rejected.set_index("id").loc[BY_NAME["dark"].clip_id]
    assert dark.reason == "no_caption" and "test/list-captioner" in dark.detail
    assert not list(out.glob(f"*/{BY_NAME['dark'].clip_id}.*"))


def test_load_captioner_without_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_captioner(None) is None
    assert load_captioner("  ") is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = str(tmp_path / "no-such-captioner")
    with pytest.raises(CaptionerError, match="no-such-captioner"):
        load_captioner(spec)


def test_colour_names_of_the_sample_palette() -> None:
    palette = {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 90, 230),
               "yellow": (230, 210, 40), "purple": (150, 60, 200), "black": (5, 5, 5),
               "white": (250, 250, 250), "grey": (128, 128, 128), "brown": (120, 70, 30),
               "orange": (240, 140, 30), "pink": (250, 170, 190), "cyan": (40, 200, 210)}
    for name, rgb in palette.items():
        image = np.full((8, 8, 3), rgb, np.uint8)
        assert colours.dominant_colours(image) == [name]
    square = red_square_frames()[0]
    assert colours.dominant_colours(square) == ["black", "red"]
    assert colours.brightness_bucket(colours.brightness(square)) == "dark"
    assert colours.brightness_bucket(colours.brightness(np.full((4, 4, 3), 250, np.uint8))) \
        == "bright"


def test_motion_levels_and_fallback_wording() -> None:
    static = 0.25
    assert [motion_level(m, static) for m in (0.3, 0.99, 1.5, 9.9, 10.5, None, float("nan"))
            ] == ["low", "low", "medium", "medium", "high", None, None]
    assert fallback_caption("dark", ["black", "red", "white"], "high", 2) == (
        "a dark video with mostly black, red and white colours, a lot of motion, "
        "showing 2 faces")
    assert fallback_caption("normal", [], None, 0) == "a video"


def test_blur_regions_only_touches_the_boxes() -> None:
    photo = skdata.astronaut()
    box = faces.detect_faces(photo)[0]
    x, y, w, h = box
    blurred = faces.blur_regions(photo, [box])
    assert faces.laplacian_variance(blurred[y:y + h, x:x + w]) < 0.05 * faces.laplacian_variance(
        photo[y:y + h, x:x + w])
    assert np.array_equal(blurred[y + 2 * h:], photo[y + 2 * h:])
    assert faces.hold_boxes({0: [box], 6: [(1, 2, 3, 4)]}, 3, 3) == [box, (1, 2, 3, 4)]
    assert faces.hold_boxes({0: [box]}, 5, 3) == []
    moved = (x + 3, y + 2, w, h)
    assert faces.confirmed([box], [moved]) == [box]
    assert faces.confirmed([box], [(x + w, y, w, h)]) == []  # beside it: not the same face


class BrokenCaptioner:
    name = "test/broken"
    version = "1"

    def caption(self, frames: list[np.ndarray]) -> str:
        raise RuntimeError("CUDA out of memory")


def test_captioner_failures_stop_the_stage(filtered: Path, workdir: Workdir,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = workdir.root.parent / "never"
    with pytest.raises(StageError, match=r"test/broken.*CUDA out of memory"):
        run_annotate(filtered, out, cfg=load_config("tiny"), workdir=workdir, quiet=True,
                     captioner=BrokenCaptioner())
    # Offline, as CI is: huggingface_hub reads the variable once, at import (likely done by
    # an earlier test), so its constant is set too; else the lookup waits on the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    cfg = load_config("tiny", ["annotate.captioner=vidops-test/no-such-captioner"])
    with pytest.raises(StageError, match="vidops-test/no-such-captioner"):
        run_annotate(filtered, out, cfg=cfg, workdir=workdir, quiet=True)
    assert not out.exists()


def test_transformers_captioner_glue(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The image-to-text pipeline wrapper, against a stand-in transformers module (nothing is
    downloaded): what it loads, what it passes the model and how it reads the answer."""
    import sys
    import types

    calls: dict = {}

    class Pipe:
        model = types.SimpleNamespace(config=types.SimpleNamespace(_commit_hash="abc123"))

        def __call__(self, image, generate_kwargs):
            calls["image"], calls["generate_kwargs"] = image, generate_kwargs
            return [{"generated_text": "an astronaut smiling"}]

    def pipeline(task, model, device):
        if "missing" in model:
            raise OSError(f"{model} is not a local folder and is not a valid model identifier")
        calls["task"], calls["model"] = task, model
        return Pipe()

    fake = types.ModuleType("transformers")
    fake.__version__ = "0.0-test"
    fake.pipeline = pipeline
    monkeypatch.setitem(sys.modules, "transformers", fake)

    local = tmp_path / "blip"
    local.mkdir()
    captioner = load_captioner(str(local))
    assert isinstance(captioner, Captioner)
    assert (captioner.name, captioner.version) == (str(local), "abc123")
    assert calls["task"] == "image-to-text" and calls["model"] == str(local.resolve())
    frames = astronaut_frames(5)
    assert captioner.caption(frames) == "an astronaut smiling"
    assert np.array_equal(np.asarray(calls["image"]), frames[2])
    assert calls["generate_kwargs"]["max_new_tokens"] > 0

    assert load_captioner("org/blip-base").name == "org/blip-base"
    assert calls["model"] == "org/blip-base"
    with pytest.raises(CaptionerError, match="org/missing"):
        load_captioner("org/missing")
