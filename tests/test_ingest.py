"""Ingest over folders, manifests and CogVideo folders, with damaged and hostile inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from vidops.cli import main as cli_main
from vidops.data.sources import SourceError
from vidops.stage import load_output
from vidops.stages.ingest import run_ingest
from vidops.tracking import mlflow_runs

from .conftest import make_clip


def _rejected(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "rejected.parquet")


def test_folder_with_damaged_files_accounts_for_every_file(cfg, workdir, damaged_folder,
                                                           tmp_path: Path) -> None:
    root, expected = damaged_folder
    out = tmp_path / "ingested"
    info = run_ingest([str(root)], out, cfg=cfg, workdir=workdir, quiet=True)
    manifest, stage_json = load_output(out)
    rejected = _rejected(out)

    assert info["counts"]["input"] == 14 == len(manifest) + len(rejected)
    outcome = {Path(uri).relative_to(root).as_posix(): reason
               for uri, reason in zip(rejected.source_uri, rejected.reason, strict=True)}
    outcome.update({name: "" for name in manifest.source_name})
    assert outcome == expected
    dup = rejected[rejected.reason == "duplicate"].iloc[0]
    assert "clip 01.mp4" in dup.detail
    for detail in rejected[rejected.reason == "unreadable"].detail:
        assert detail and ".partial-" not in detail

    by_name = manifest.set_index("source_name")
    assert by_name.loc["straße café.mp4", ["width", "height", "frame_count"]].tolist() == [
        128, 96, 30]
    assert by_name.loc["straße café.mp4", "fps"] == pytest.approx(25.0)
    assert by_name.loc["日本語 clip.mkv", ["width", "height", "frame_count"]].tolist() == [
        112, 80, 20]
    assert by_name.loc["日本語 clip.mkv", "fps"] == pytest.approx(30.0)
    assert by_name.loc["web.webm", "frame_count"] == 16
    assert by_name.loc["long.mp4", "duration_s"] == pytest.approx(4.0, abs=0.05)
    assert by_name.loc["camera.mov", ["width", "height", "frame_count"]].tolist() == [160, 120, 50]
    assert by_name.loc["camera.mov", "fps"] == pytest.approx(25.0)
    assert by_name["has_audio"].to_dict() == {name: name == "camera.mov" for name in by_name.index}
    for row in manifest.itertuples():
        media = out / row.path
        assert media.is_file() and media.stat().st_size == row.size_bytes
        assert row.id == row.source_sha256 and row.source_sha256 in row.path

    assert stage_json["dvc"]["md5"].endswith(".dir")
    assert stage_json["mlflow"]["run_id"]


def test_dvc_md5_changes_with_the_input_and_not_otherwise(cfg, workdir, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_clip(src / "a.mp4", seed=1)
    make_clip(src / "b.mp4", seed=2)
    first = run_ingest([str(src)], tmp_path / "o1", cfg=cfg, workdir=workdir, quiet=True)
    again = run_ingest([str(src)], tmp_path / "o1", cfg=cfg, workdir=workdir, quiet=True)
    assert again["dvc"]["md5"] == first["dvc"]["md5"]
    assert again["mlflow"]["run_id"] != first["mlflow"]["run_id"]

    make_clip(src / "b.mp4", seed=3)
    changed = run_ingest([str(src)], tmp_path / "o1", cfg=cfg, workdir=workdir, quiet=True)
    assert changed["dvc"]["md5"] != first["dvc"]["md5"]

    # The version is on the remote: the directory listing object exists under its md5.
    md5 = changed["dvc"]["md5"]
    assert (Path(changed["dvc"]["remote"]) / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def test_mlflow_run_records_the_dataset_counts_and_stage_json(cfg, workdir, tmp_path) -> None:
    src = tmp_path / "src"
    make_clip(src / "a.mp4", seed=1)
    (src / "broken.mp4").write_bytes(b"\x00" * 100)
    info = run_ingest([str(src)], tmp_path / "out", cfg=cfg, workdir=workdir, quiet=True)
    mlflow_runs.configure(cfg, workdir)
    run = MlflowClient().get_run(info["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["kept"] == 1 and run.data.metrics["rejected_unreadable"] == 1
    assert run.data.params["ingest.min_packet_coverage"] == str(cfg.ingest.min_packet_coverage)
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == info["dvc"]["md5"]
    assert dataset_input.dataset.name == "ingest"
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"stage.json", "manifest.parquet", "rejected.parquet"} <= artifacts


def test_manifest_sources_csv_and_jsonl_with_captions_licenses_and_escapes(
    cfg, workdir, tmp_path: Path
) -> None:
    root = tmp_path / "collection"
    make_clip(root / "videos" / "one.mp4", seed=1)
    make_clip(root / "videos" / "two clip.mkv", seed=2)
    make_clip(root / "videos" / "three.mp4", seed=3)
    (root / "videos" / "three.txt").write_text("a sidecar caption")
    outside = make_clip(tmp_path / "elsewhere" / "secret.mp4", seed=4)
    (root / "videos" / "link.mp4").symlink_to(outside)

    csv = root / "list.csv"
    csv.write_text(
        "uri,caption,license\n"
        "videos/one.mp4,a clip with a caption,CC-BY-4.0\n"
        f"{(root / 'videos' / 'two clip.mkv').as_uri()},,MIT\n"
        "videos/three.mp4,,\n"
        "../elsewhere/secret.mp4,escape by dots,\n"
        f"{outside},escape by absolute path,\n"
        "videos/link.mp4,escape by symlink,\n"
    )
    info = run_ingest([str(csv)], tmp_path / "out", cfg=cfg, workdir=workdir, quiet=True)
    manifest, _ = load_output(tmp_path / "out")
    rejected = _rejected(tmp_path / "out")
    assert info["counts"] == {"input": 6, "kept": 3, "rejected": 3,
                              "by_reason": {"path_escape": 3}}
    rows = manifest.set_index("source_name")
    assert rows.loc["videos/one.mp4", ["caption", "caption_origin", "license"]].tolist() == [
        "a clip with a caption", "manifest", "CC-BY-4.0"]
    assert rows.loc["videos/three.mp4", ["caption", "caption_origin"]].tolist() == [
        "a sidecar caption", "sidecar"]
    assert pd.isna(rows.loc["videos/three.mp4", "license"])
    two = next(name for name in rows.index if "two clip" in name)
    assert rows.loc[two, "license"] == "MIT"
    assert rejected.source_sha256.isna().all(), "escaping paths are never read"

    jsonl = root / "list.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"uri": "videos/one.mp4", "caption": "from jsonl", "license": "CC0-1.0"},
        {"uri": "videos/../../elsewhere/secret.mp4"},
    ]) + "\n")
    info = run_ingest([str(jsonl)], tmp_path / "out2", cfg=cfg, workdir=workdir, quiet=True)
    assert info["counts"]["by_reason"] == {"path_escape": 1}
    assert load_output(tmp_path / "out2")[0].caption.tolist() == ["from jsonl"]


def test_cogvideo_folder_aligns_prompts_with_videos(cfg, workdir, tmp_path: Path) -> None:
    root = tmp_path / "cog"
    for i in range(3):
        make_clip(root / "videos" / f"{i}.mp4", seed=10 + i)
    (root / "prompts.txt").write_text("a red ball\na blue box\nthe escaping one\n")
    (root / "videos.txt").write_text("videos/0.mp4\nvideos/1.mp4\n../../etc/passwd\n")
    info = run_ingest([str(root)], tmp_path / "out", cfg=cfg, workdir=workdir, quiet=True)
    manifest, _ = load_output(tmp_path / "out")
    assert info["counts"]["by_reason"] == {"path_escape": 1}
    assert dict(zip(manifest.source_name, manifest.caption, strict=True)) == {
        "videos/0.mp4": "a red ball", "videos/1.mp4": "a blue box"}
    assert set(manifest.caption_origin) == {"prompts.txt"}

    (root / "prompts.txt").write_text("only one prompt\n")
    with pytest.raises(SourceError, match="line-aligned"):
        run_ingest([str(root)], tmp_path / "out", cfg=cfg, workdir=workdir, quiet=True)


def test_defect_corpus_gets_the_ingest_reasons(cfg, workdir, tmp_path: Path) -> None:
    from vidops.data.samples import write_samples

    report = write_samples(tmp_path / "defects", "defects", seed=0)
    run_ingest([str(report.out_dir)], tmp_path / "out", cfg=cfg, workdir=workdir, quiet=True)
    rejected = _rejected(tmp_path / "out")
    got = {Path(u).name: r for u, r in zip(rejected.source_uri, rejected.reason, strict=True)}
    # Ingest decides what it can see without decoding: the rest is the filter stage's job.
    assert got == {name: reason for name, reason in report.expected.items()
                   if reason in ("unreadable", "duplicate")}
    _, info = load_output(tmp_path / "out")
    assert "expected.json" in " ".join(info["ignored_files"]["paths"])


def test_cli_ingest_exit_codes(cfg, tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    make_clip(src / "a.mp4", seed=1)
    work = tmp_path / "work"
    code = cli_main(["ingest", "--source", str(src), "--out", str(tmp_path / "out"),
                     "--workdir", str(work), "--config", "tiny", "--quiet"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["counts"]["kept"] == 1 and printed["dvc_md5"]
    assert cli_main(["ingest", "--source", str(tmp_path / "missing"),
                     "--workdir", str(work), "--quiet"]) == 2
    assert "source not found" in capsys.readouterr().err
    assert cli_main(["ingest", "--source", str(src), "--workdir", str(work), "--quiet",
                     "--set", "ingest.bogus=1"]) == 2
    assert "unknown key 'ingest.bogus'" in capsys.readouterr().err
    shutil.rmtree(work)


def test_fsspec_urls_in_a_remote_manifest(cfg, workdir, tmp_path: Path) -> None:
    """Any installed fsspec protocol listed in ingest.allowed_schemes: here the in-memory
    one, which lives in this process only, so the workers are turned off (remote stores such
    as s3:// need no such care)."""
    import fsspec

    from vidops.config import load_config

    fs = fsspec.filesystem("memory")
    for i, name in enumerate(["bucket/videos/a.mp4", "bucket/videos/b.mkv"]):
        fs.pipe(name, make_clip(tmp_path / Path(name).name, seed=20 + i).read_bytes())
    fs.pipe("bucket/videos/bad.mp4", b"not a video")
    fs.pipe("bucket/list.jsonl", b"\n".join([
        b'{"uri": "videos/a.mp4", "caption": "remote a", "license": "CC0-1.0"}',
        b'{"uri": "memory://bucket/videos/b.mkv"}',
        b'{"uri": "videos/bad.mp4"}',
    ]))
    single = load_config("tiny", ["ingest.workers=1", "ingest.allowed_schemes=[file,memory]"])
    info = run_ingest(["memory://bucket/list.jsonl"], tmp_path / "out", cfg=single,
                      workdir=workdir, quiet=True)
    manifest, _ = load_output(tmp_path / "out")
    assert info["counts"] == {"input": 3, "kept": 2, "rejected": 1,
                              "by_reason": {"unreadable": 1}}
    assert set(manifest.source_uri) == {"memory://bucket/videos/a.mp4",
                                        "memory://bucket/videos/b.mkv"}
    assert manifest.set_index("source_name").loc["videos/a.mp4", "caption"] == "remote a"
    assert (manifest.frame_count == 24).all()
