"""The filter stage: gates, one-pass analysis, clips, dedup, and its accounting."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
from skimage.data import astronaut

from vidops.config import load_config
from vidops.data.manifest import FILTER_COLUMNS
from vidops.data.samples import write_samples
from vidops.data.shards import plan_shards, read_shard, write_shards
from vidops.media.video import write_video
from vidops.stage import load_output
from vidops.stages.filter import dedup, run_filter
from vidops.stages.ingest import run_ingest


def _decisions(out: Path) -> dict[str, set[str]]:
    """source name -> the set of decisions of its rows ("kept" or a reason code)."""
    manifest, _ = load_output(out)
    rejected = pd.read_parquet(out / "rejected.parquet")
    decisions: dict[str, set[str]] = {}
    for uri in manifest.source_uri:
        decisions.setdefault(Path(uri).name, set()).add("kept")
    for uri, reason in zip(rejected.source_uri, rejected.reason, strict=True):
        decisions.setdefault(Path(uri).name, set()).add(reason)
    return decisions


@pytest.fixture(scope="module")
def defects_filtered(tmp_path_factory) -> tuple[Path, dict, dict]:
    """Defects + a portrait clip + a photo clip with a cut, through ingest and filter."""
    from vidops.tracking.workdir import Workdir

    root = tmp_path_factory.mktemp("filter")
    cfg = load_config("tiny")
    workdir = Workdir.at(root / "work")
    report = write_samples(root / "src", "defects", seed=0)
    photos = write_samples(root / "photos", "photos", count=3, seed=0)
    cut_clip = next(p for p in photos.files if "-cut-" in p.name)
    (root / "src" / cut_clip.name).write_bytes(cut_clip.read_bytes())
    # A 192x320 portrait clip: a slow vertical pan over a photograph, 3 s.
    photo = astronaut()
    portrait = [np.ascontiguousarray(photo[2 * t:2 * t + 320, 160:352]) for t in range(72)]
    write_video(root / "src" / "portrait.mp4", portrait, 24)
    run_ingest([str(root / "src")], root / "ingest", cfg=cfg, workdir=workdir, quiet=True)
    info = run_filter(root / "ingest", root / "filter", cfg=cfg, workdir=workdir, quiet=True)
    return root / "filter", report.expected, info | {"cut_clip": cut_clip.name}


def test_every_defect_gets_its_reason(defects_filtered) -> None:
    out, expected, _ = defects_filtered
    decisions = _decisions(out)
    for name, reason in expected.items():
        if reason in ("unreadable", "duplicate"):
            assert name not in decisions, "ingest rejected it already"
            continue
        assert decisions[name] == {reason or "kept"}, name
    assert decisions["portrait.mp4"] == {"kept"}


def test_clips_are_normalised_with_aspect_kept(defects_filtered) -> None:
    out, _, info = defects_filtered
    manifest, _ = load_output(out)
    assert list(manifest.columns) == FILTER_COLUMNS
    assert manifest.clip_id.is_unique
    cfg = load_config("tiny")
    for row in manifest.itertuples():
        with av.open(str(out / row.path)) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.name, stream.width, stream.height) == (
                "h264", row.width, row.height)
            assert not container.streams.audio
            assert float(stream.average_rate) == pytest.approx(cfg.filter.normalise.fps)
        assert min(row.width, row.height) == cfg.filter.normalise.short_side
        source_aspect = row.source_width / row.source_height
        assert row.width / row.height == pytest.approx(source_aspect, rel=0.03)
        assert row.clip_id.startswith(row.source_sha256[:16])
    portrait = manifest[manifest.source_name == "portrait.mp4"].iloc[0]
    assert portrait.height > portrait.width
    # The clip with a hard cut is split into two clips at the cut.
    cut = manifest[manifest.source_name == info["cut_clip"]]
    assert len(cut) == 2
    assert len(info["scene_cuts"][cut.source_sha256.iloc[0]]) == 1


def test_accounting_and_validation(defects_filtered) -> None:
    out, _, info = defects_filtered
    counts = info["counts"]
    assert counts["input"] == counts["inputs_kept"] + counts["inputs_rejected"]
    assert (out / "validation.json").is_file()
    assert (out / "data_docs" / "index.html").is_file()
    assert json.loads((out / "validation.json").read_text())["success"] is True
    assert info["validation"]["success"] is True
    rejected_files = {p.name for p in (out / "clips").iterdir()}
    manifest, _ = load_output(out)
    assert rejected_files == {Path(p).name for p in manifest.path}, "no files of rejected clips"


def _thumbnail(yuv: tuple[int, int, int]) -> str:
    """A thumbnail (16x16 luma, 8x8 chroma) of a square of colour `yuv` on black."""
    luma = np.full((16, 16), 16, np.uint8)
    luma[4:10, 4:10] = yuv[0]
    u, v = (np.full((8, 8), 128, np.uint8) for _ in range(2))
    u[2:5, 2:5], v[2:5, 2:5] = yuv[1], yuv[2]
    return (luma.tobytes() + u.tobytes() + v.tobytes()).hex()


def _clip(clip_id: str, hashes: list[int], colour: tuple, area: int, sharp: float) -> dict:
    row = dict.fromkeys(FILTER_COLUMNS)
    row.update(clip_id=clip_id, source_uri=f"/{clip_id}.mp4", source_sha256=clip_id * 4,
               phashes=",".join(f"{h:016x}" for h in hashes), phash=f"{hashes[1]:016x}",
               thumbnails=",".join([_thumbnail(colour)] * 3), source_width=area,
               source_height=1, sharpness=sharp)
    return row


def test_dedup_keeps_the_higher_resolution_then_sharper_copy() -> None:
    cfg = load_config("tiny")
    base = [0x0F0F0F0F0F0F0F0F, 0x00FF00FF00FF00FF, 0x123456789ABCDEF0]
    near = [h ^ 0b111 for h in base]  # 3 bits off
    clips = pd.DataFrame([
        _clip("small", near, (100, 50, 50), 100, 90.0),
        _clip("large", base, (101, 50, 49), 400, 10.0),
        _clip("other-colour", base, (20, 200, 40), 100, 50.0),
        _clip("different", [~h & 0xFFFFFFFFFFFFFFFF for h in base], (100, 50, 50), 100, 5.0),
    ])
    kept, rejected = dedup(clips, cfg)
    assert sorted(kept.clip_id) == ["different", "large", "other-colour"]
    assert [r["id"] for r in rejected] == ["small"]
    assert "near duplicate of large" in rejected[0]["detail"]


def test_shards_are_balanced_by_duration_and_cover_every_source(tmp_path: Path) -> None:
    manifest = pd.DataFrame({"source_sha256": [f"{i:064x}" for i in range(7)],
                             "duration_s": [10, 9, 2, 2, 2, 2, 1]})
    shards = plan_shards(manifest, 2)
    loads = [manifest.set_index("source_sha256").loc[s, "duration_s"].sum() for s in shards]
    assert sorted(s for shard in shards for s in shard) == sorted(manifest.source_sha256)
    assert abs(loads[0] - loads[1]) <= 2
    paths = write_shards(manifest, 3, tmp_path / "shards")
    names = [read_shard(p)[0] for p in paths]
    assert read_shard(paths[0])[2] is None
    assert names == ["shard-00", "shard-01", "shard-02"]
    assert plan_shards(manifest.iloc[:0], 4) == [[]], "an empty dataset still has one shard"


def test_a_blurry_copy_of_a_kept_clip_is_a_near_duplicate() -> None:
    from vidops.stages.filter import relabel_copies

    cfg = load_config("tiny")
    base = [0x0F0F0F0F0F0F0F0F, 0x00FF00FF00FF00FF, 0x123456789ABCDEF0]
    kept = pd.DataFrame([_clip("original", base, (100, 50, 50), 400, 2.0)])
    rejected = [
        {"id": "copy", "source_uri": "/copy.mkv", "source_sha256": "c" * 64,
         "reason": "blurry", "detail": "sharpness 0.2"},
        {"id": "unrelated", "source_uri": "/x.mp4", "source_sha256": "d" * 64,
         "reason": "blurry", "detail": "sharpness 0.1"},
    ]
    thumbnails = ",".join([_thumbnail((99, 51, 50))] * 3)
    scored = {"copy": (",".join(f"{h ^ 1:016x}" for h in base), thumbnails),
              "unrelated": (",".join(f"{~h & (2**64 - 1):016x}" for h in base), thumbnails)}
    relabel_copies(rejected, scored, kept, cfg)
    assert [r["reason"] for r in rejected] == ["near_duplicate", "blurry"]
    assert "near duplicate of original" in rejected[0]["detail"]
    assert "also blurry" in rejected[0]["detail"]
