"""Great Expectations gates: suites per stage, validation.json, offline Data Docs."""

from __future__ import annotations

import hashlib
import json
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from vidops.config import Config
from vidops.data.manifest import ANNOTATE_COLUMNS, FILTER_COLUMNS
from vidops.quality import SUITE_STAGES, ValidationReport, build_suite, validate_manifest
from vidops.stages.ingest import MANIFEST_COLUMNS


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every test here runs with the network cut, GX's first import included; attempts are
    recorded too, because a library that swallows the error would otherwise go unnoticed."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args[1:] if args else kwargs)
        raise OSError("network access in a vidops.quality test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


def _sha(i: int) -> str:
    return hashlib.sha256(f"video-{i}".encode()).hexdigest()


def ingest_manifest(n: int = 3) -> pd.DataFrame:
    rows = [{
        "id": _sha(i), "source_sha256": _sha(i), "source_uri": f"file:///in/clip{i}.mp4",
        "source_name": f"clip{i}.mp4", "source": "file:///in", "path": f"media/{_sha(i)[:2]}/x.mp4",
        "size_bytes": 12345, "container": "mov,mp4,m4a,3gp,3g2,mj2", "codec": "h264",
        "pix_fmt": "yuv420p", "width": 128, "height": 128, "fps": 24.0, "frame_count": 72,
        "duration_s": 3.0, "has_audio": False, "bit_rate": 100000,
        "caption": "a red circle moving left", "caption_origin": "sidecar", "license": None,
    } for i in range(n)]
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def annotate_manifest(n: int = 4) -> pd.DataFrame:
    rows = []
    for i in range(n):
        sha = _sha(i)
        clip_id = f"{sha[:16]}-{0:06d}-{48:06d}"
        rows.append({
            "clip_id": clip_id, "source_sha256": sha, "source_uri": f"file:///in/clip{i}.mp4",
            "source_name": f"clip{i}.mp4", "license": None,
            "caption": "a red circle moving left", "caption_origin": "sidecar",
            "scene_index": 0, "clip_index": 0, "start_frame": 0, "end_frame": 48,
            "start_s": 0.0, "end_s": 2.0, "duration_s": 2.0,
            "width": 128 + 2 * i, "height": 128, "fps": 24.0, "frames": 48,
            "sharpness": 55.0, "motion": 0.4, "frame_diff": 3.5,
            "phash": f"{i:016x}", "phashes": f"{i:016x},{i:016x},{i:016x}",
            "mean_r": 20.0, "mean_g": 15.0, "mean_b": 10.0, "path": f"clips/{clip_id}.mp4",
            "caption_model": "ingest", "keyframe": f"keyframes/{clip_id}.jpg",
            "face_count": 0, "faces_blurred": False, "brightness": 40.0,
            "dominant_colours": "black,red", "motion_level": "medium", "tags": "red,circle",
            "annotators": json.dumps({"caption": "ingest"}),
        })
    frame = pd.DataFrame(rows, columns=ANNOTATE_COLUMNS)
    for column in ("caption", "license", "source_uri", "clip_id", "path", "keyframe"):
        frame[column] = frame[column].astype("string")  # as the stages write them
    return frame


def latent_manifest(n: int = 3) -> pd.DataFrame:
    rows = [{"clip_id": f"clip-{i}", "key": f"{i:064x}", "shard": f"latents/{7:064x}.safetensors",
             "tensors": "latents,prompt_embeds,prompt_mask", "latents_shape": [4, 3, 16, 16],
             "prompt_embeds_shape": [32, 384], "prompt_mask_shape": [32],
             "caption": "a red circle moving left", "source_sha256": _sha(i)} for i in range(n)]
    return pd.DataFrame(rows)


def manifest_for(stage: str) -> pd.DataFrame:
    if stage in ("encode", "encoded"):
        return latent_manifest()
    if stage == "ingest":
        return ingest_manifest()
    if stage == "filter":
        return annotate_manifest()[FILTER_COLUMNS]
    return annotate_manifest()


def test_unknown_stage_is_an_error(cfg: Config, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pretrain"):
        build_suite("pretrain", cfg)
    with pytest.raises(ValueError, match="no expectation suite"):
        validate_manifest("pretrain", ingest_manifest(), cfg, tmp_path)
    assert not (tmp_path / "validation.json").exists()


def test_suites_take_thresholds_from_config(cfg: Config) -> None:
    assert SUITE_STAGES == ("ingest", "filter", "annotate", "curated", "encode", "encoded")
    suites = {stage: build_suite(stage, cfg) for stage in SUITE_STAGES}
    assert {s.name for s in suites.values()} == {f"vidops-{stage}" for stage in SUITE_STAGES}

    def kwargs_of(stage: str, kind: str, column: str) -> list[dict[str, Any]]:
        return [e.configuration.kwargs for e in suites[stage].expectations
                if e.expectation_type == kind and e.configuration.kwargs.get("column") == column]

    between = "expect_column_values_to_be_between"
    assert kwargs_of("filter", between, "sharpness")[0]["min_value"] == cfg.filter.blurry_threshold
    assert kwargs_of("filter", between, "motion")[0]["min_value"] == cfg.filter.static_threshold
    fps = kwargs_of("filter", between, "fps")[0]
    assert fps["min_value"] < cfg.filter.normalise.fps < fps["max_value"]
    lengths = kwargs_of("annotate", "expect_column_value_lengths_to_be_between", "caption")[0]
    assert lengths["max_value"] == cfg.annotate.max_caption_chars
    # curated is held to the annotate rules under its own name.
    assert ([e.expectation_type for e in suites["curated"].expectations]
            == [e.expectation_type for e in suites["annotate"].expectations])
    assert not kwargs_of("ingest", between, "sharpness")
    counted = build_suite("ingest", cfg, expected_rows=7)
    assert any(e.expectation_type == "expect_table_row_count_to_equal"
               and e.configuration.kwargs["value"] == 7 for e in counted.expectations)


@pytest.mark.parametrize("stage", SUITE_STAGES)
def test_good_manifest_passes_with_docs(stage: str, cfg: Config, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    manifest = manifest_for(stage)
    out = tmp_path / "out"

    report = validate_manifest(stage, manifest, cfg, out, counts={"kept": len(manifest)})

    assert isinstance(report, ValidationReport)
    assert report.success, report.failed
    assert report.failed == []
    assert report.evaluated == report.successful > 10
    assert list(scratch.iterdir()) == [], "the temporary GX project was left behind"

    doc = json.loads((out / "validation.json").read_text(encoding="utf-8"))
    assert doc["stage"] == stage and doc["suite"] == f"vidops-{stage}"
    assert doc["success"] is True and doc["failed"] == []
    assert doc["statistics"]["evaluated_expectations"] == report.evaluated
    assert doc["gx_version"].startswith("1.")
    assert len(doc["result"]["results"]) == report.evaluated
    assert report.to_dict() == {"stage": stage, "success": True, "evaluated": report.evaluated,
                                "successful": report.successful, "failed": []}

    index = (out / "data_docs" / "index.html").read_text(encoding="utf-8")
    assert f"vidops-{stage}" in index
    assert 'id="vidops-validation-summary"' in index
    pages = list((out / "data_docs" / "validations").rglob("*.html"))
    assert len(pages) == 1
    assert pages[0].relative_to(out / "data_docs").as_posix() in index
    assert "Expectation Validation Result" in pages[0].read_text(encoding="utf-8")
    for page in (out / "data_docs").rglob("*.html"):
        assert "great-expectations-web-assets.s3" not in "".join(
            line for line in page.read_text(encoding="utf-8").splitlines()
            if "<img" in line or "src=" in line), page


@pytest.mark.parametrize(("defect", "expected"), [
    ("duplicate_clip_id", "expect_column_values_to_be_unique(clip_id): 2 unexpected"),
    ("null_caption", "expect_column_values_to_not_be_null(caption): 1 unexpected"),
    ("width_out_of_range", "expect_column_values_to_be_between(width): 1 unexpected"),
])
def test_defect_fails_naming_the_expectation(defect: str, expected: str, cfg: Config,
                                             tmp_path: Path) -> None:
    manifest = annotate_manifest()
    if defect == "duplicate_clip_id":
        manifest = pd.concat([manifest, manifest.iloc[[1]]], ignore_index=True)
    elif defect == "null_caption":
        manifest.loc[2, "caption"] = pd.NA
    else:
        manifest.loc[3, "width"] = 8194  # even, so only the range check can object

    report = validate_manifest("annotate", manifest, cfg, tmp_path)

    assert not report.success
    assert len(report.failed) == 1, report.failed
    assert report.failed[0].startswith(expected), report.failed
    assert report.successful == report.evaluated - 1
    if defect == "width_out_of_range":
        assert "e.g. [8194]" in report.failed[0]
    doc = json.loads((tmp_path / "validation.json").read_text(encoding="utf-8"))
    assert doc["success"] is False and doc["failed"] == report.failed
    index = (tmp_path / "data_docs" / "index.html").read_text(encoding="utf-8")
    assert "FAILED" in index and expected.split(":")[0] in index


def test_bad_ingest_manifest_fails(cfg: Config, tmp_path: Path) -> None:
    manifest = ingest_manifest(2)
    manifest.loc[0, "source_sha256"] = "NOT-A-HASH"
    manifest.loc[1, "fps"] = 0.0
    report = validate_manifest("ingest", manifest, cfg, tmp_path,
                               counts={"input": 4, "kept": 3, "rejected": 1})
    assert not report.success
    assert report.failed == [
        "expect_table_row_count_to_equal: observed 2, expected value=3",
        "expect_column_values_to_match_regex(source_sha256): 1 unexpected, e.g. ['NOT-A-HASH']",
        "expect_column_values_to_be_between(fps): 1 unexpected, e.g. [0.0]",
    ]


def test_empty_filter_manifest_fails_without_crashing(cfg: Config, tmp_path: Path) -> None:
    empty = annotate_manifest(0)[FILTER_COLUMNS]
    report = validate_manifest("filter", empty, cfg, tmp_path / "a")
    assert not report.success
    assert report.failed == ["expect_table_row_count_to_be_between: observed 0, "
                             "expected min_value=1"]
    assert (tmp_path / "a" / "data_docs" / "index.html").is_file()

    # Not even the columns: every column expectation errors, none raises.
    report = validate_manifest("filter", pd.DataFrame(), cfg, tmp_path / "b")
    assert not report.success and report.successful == 0
    assert report.failed[0].startswith("expect_table_columns_to_match_set: missing ")
    assert json.loads((tmp_path / "b" / "validation.json").read_text())["success"] is False


def test_socket_guard_is_live(no_network: list[Any]) -> None:
    with pytest.raises(OSError, match="network access"):
        socket.create_connection(("pypi.org", 443))
    assert no_network
    no_network.clear()  # the teardown check is for the code under test, not this probe

