"""Shared fixtures: a tiny configuration, an isolated workdir, and real little videos."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from vidops.config import Config, load_config
from vidops.tracking.workdir import Workdir

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

# Under pytest-xdist (`make test` runs the suite on several workers) the cores are shared:
# each worker and every process it starts (kfp.local tasks, torchrun ranks, stage workers)
# gets its share of threads, rather than each assuming the whole machine.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(variable, threads)
    torch.set_num_threads(int(threads))


@pytest.fixture
def cfg() -> Config:
    return load_config("tiny")


@pytest.fixture
def workdir(tmp_path: Path) -> Workdir:
    return Workdir.at(tmp_path / "work")


def clip_frames(seed: int, width: int = 96, height: int = 64, frames: int = 24) -> list:
    """Distinct, decodable content: a bright square moving over seeded noise."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 120, (height, width, 3), dtype=np.uint8)
    out = []
    for t in range(frames):
        frame = background.copy()
        x = (4 + 2 * t) % (width - 16)
        frame[20:36, x:x + 16] = (230, 200, 40)
        out.append(frame)
    return out


def make_clip(path: Path, seed: int = 0, *, width: int = 96, height: int = 64,
              frames: int = 24, fps: float = 24.0) -> Path:
    from vidops.media.video import write_video

    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, clip_frames(seed, width, height, frames), fps)
    return path


def faststart_copy(src: Path, dst: Path) -> Path:
    """The same video with its index (moov) first, as web-ready MP4s are written."""
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(src),
                    "-c", "copy", "-movflags", "+faststart", str(dst)], check=True)
    return dst


@pytest.fixture
def damaged_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """14 files: good clips in several containers and odd names, a byte-identical copy and
    four damaged files. Returns the folder and the expected outcome per relative name."""
    root = tmp_path / "incoming"
    expected: dict[str, str] = {}
    good = [("clip 01.mp4", 96, 64, 24, 24.0), ("straße café.mp4", 128, 96, 30, 25.0),
            ("日本語 clip.mkv", 112, 80, 20, 30.0), ("web.webm", 96, 64, 16, 24.0),
            ("nested/deep/a b.mp4", 96, 64, 12, 12.0),
            ("x.m4v", 96, 64, 24, 24.0), ("long.mp4", 96, 64, 96, 24.0),
            ("y.avi", 96, 64, 24, 24.0)]
    for i, (name, w, h, n, fps) in enumerate(good):
        target = root / name
        if name.endswith(".avi"):
            target.parent.mkdir(parents=True, exist_ok=True)
            from vidops.media.video import write_video

            write_video(target, clip_frames(i, w, h, n), fps, codec="mpeg4")
        else:
            make_clip(target, seed=i, width=w, height=h, frames=n, fps=fps)
        expected[name] = ""
    # A camera-like file from FFmpeg itself, with an AAC audio track beside the video.
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error",
                    "-f", "lavfi", "-i", "testsrc=size=160x120:rate=25",
                    "-f", "lavfi", "-i", "sine=frequency=440", "-t", "2",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
                    str(root / "camera.mov")], check=True)
    expected["camera.mov"] = ""
    shutil.copyfile(root / "clip 01.mp4", root / "nested" / "zz copy.mp4")
    expected["nested/zz copy.mp4"] = "duplicate"

    faststart = faststart_copy(make_clip(tmp_path / "src.mp4", seed=99, frames=48),
                               tmp_path / "fs.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(faststart[: len(faststart) // 2])
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.mp4").write_text("this is a text file, not a video\n" * 20)
    garbled = bytearray(faststart)
    for i in range(1500, len(garbled), 701):
        garbled[i] ^= 0xFF
    (root / "garbled.mov").write_bytes(bytes(garbled))
    for name in ("truncated.mp4", "empty.mp4", "notes.mp4", "garbled.mov"):
        expected[name] = "unreadable"
    assert len(expected) == 14
    return root, expected


def make_curated(workdir: Workdir, specs: list[tuple[str, int, int]], cfg: Config,
                 name: str = "curated", caption: str = "a yellow square moving right {seed}"
                 ) -> Path:
    """A finished stage output of real H.264 clips (clip_id, seed, frames) with captions, as
    merge writes it: what encode reads."""
    import pandas as pd

    from vidops.data.manifest import rejected_frame
    from vidops.stage import StageContext, StageOutcome, run_stage

    def body(ctx: StageContext) -> StageOutcome:
        rows = []
        for clip_id, seed, frames in specs:
            make_clip(ctx.out_dir / "clips" / f"{clip_id}.mp4", seed=seed, frames=frames)
            rows.append({"clip_id": clip_id, "source_sha256": f"{seed:064x}",
                         "source_uri": f"file:///src/{clip_id}.mp4",
                         "caption": caption.format(seed=seed),
                         "duration_s": frames / 24, "fps": 24.0,
                         "path": f"clips/{clip_id}.mp4"})
        return StageOutcome(len(rows), pd.DataFrame(rows), rejected_frame([]), "fixture")

    out = workdir.root / "data" / name
    run_stage("fixture", body, cfg=cfg, workdir=workdir, out_dir=out, quiet=True)
    return out


def make_pretrained(workdir: Workdir, specs: list[tuple[str, int, int]], cfg: Config,
                    caption: str) -> Path:
    """A model pretrained (per `cfg`) on real clips curated and encoded by the stages: the
    base that fine-tune, evaluate and register tests start from."""
    from vidops.stages.encode import run_encode
    from vidops.stages.pretrain import pretrain

    curated = make_curated(workdir, specs, cfg, caption=caption)
    encoded = run_encode(curated, workdir.stage_dir("encoded"), cfg=cfg, workdir=workdir,
                         quiet=True)["output"]["dir"]
    model = workdir.models / "pretrain"
    pretrain(Path(encoded), model, cfg=cfg, workdir=workdir, quiet=True)
    return model


class TinyI3D(torch.nn.Module):
    """Stands in for i3d_torchscript.pt (not shipped: FVD users point evaluate.i3d_path at
    their own copy). Same call signature; features are each channel's mean and std."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = True,
                return_features: bool = True) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)
