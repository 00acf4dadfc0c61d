"""lineage.html: complete, escaped, offline, and robust to a sparse lineage."""

from __future__ import annotations

import re
from pathlib import Path

from vidops.tracking.lineage_html import write_lineage_html

SHA = {name: (name * 64)[:64] for name in ("a", "b", "c")}  # sources a, b used; c rejected
URI = {name: f"https://example.org/videos/{name}.mp4" for name in SHA}
EVIL = "<script>alert(1)</script>"
STAGES = ("ingest", "filter", "encode")


def _clip(i: int, source: str, held_out: bool = False, caption: str = "a red ball") -> dict:
    return {"clip_id": f"clip-{i:03d}", "source_sha256": SHA[source], "start_frame": 16 * i,
            "end_frame": 16 * i + 15, "start_s": 2.0 * i, "end_s": 2.0 * i + 1.9,
            "sharpness": 123.4, "motion": 0.05, "caption": caption,
            "caption_origin": "vlm", "face_count": 0, "faces_blurred": None,
            "held_out": held_out, "dataset": "shapes-encoded"}


def _dataset(name: str, stage: str, md5: str, role: str = "model") -> dict:
    return {"name": name, "stage": stage, "role": role, "dvc_md5": md5, "remote": "local",
            "nfiles": 5, "manifest_sha256": "sha256:" + "f" * 64,
            "validation": {"suite": f"{stage}_suite", "success": stage != "filter",
                           "evaluated": 4, "successful": 3 if stage == "filter" else 4,
                           "failed": ["expect_column_values_to_be_between"]
                           if stage == "filter" else []},
            "counts": {"input": 3, "kept": 2, "rejected": 1, "by_reason": {"blurry": 1}},
            "mlflow_run_id": f"run-{stage}", "finished_at": "2024-05-01T10:00:00Z"}


def _lineage() -> dict:
    return {
        "format": 1, "created_at": "2024-05-02T12:00:00Z", "code_version": "abc1234",
        "model": {"ref": "runs:/r1/model", "path": "/models/m1", "name": "shapes-t2v",
                  "kind": "finetune", "digest": "sha256:" + "d" * 64,
                  "registered": {"name": "shapes-t2v", "version": "3", "aliases": ["champion"],
                                 "run_id": "r1", "tags": {"team": "video"}}},
        "training_runs": [{"stage": "pretrain", "mlflow_run_id": "r0", "status": "FINISHED",
                           "start_time": "2024-05-01T11:00:00Z", "code_version": "abc1234",
                           "params": {"lr": "1e-4"}, "model_dir": "/models/m0"}],
        "datasets": [_dataset("shapes-raw", "ingest", "md5-ingest-0001"),
                     _dataset("shapes-filtered", "filter", "md5-filter-0002"),
                     _dataset("shapes-encoded", "encode", "md5-encode-0003", role="base")],
        "sources": [
            {"source_sha256": SHA["a"], "source_uri": URI["a"], "license": "CC-BY-4.0",
             "size_bytes": 123456, "ingested_at": "2024-05-01T09:00:00Z", "status": "used",
             "stage": None, "reason": None, "detail": None, "clips": 2},
            {"source_sha256": SHA["b"], "source_uri": URI["b"], "license": None,
             "size_bytes": None, "ingested_at": "2024-05-01T09:00:00Z", "status": "used",
             "stage": None, "reason": None, "detail": None, "clips": 2},
            {"source_sha256": SHA["c"], "source_uri": URI["c"], "license": "CC0-1.0",
             "size_bytes": 999, "ingested_at": "2024-05-01T09:00:00Z", "status": "rejected",
             "stage": "filter", "reason": "blurry", "detail": "sharpness 3.2 < 50", "clips": 0}],
        "clips": [_clip(0, "a"), _clip(1, "a", held_out=True), _clip(2, "b", caption=EVIL),
                  _clip(3, "b")],
        "rejected": [{"stage": "filter", "dataset": "shapes-filtered", "id": "c-0",
                      "source_uri": URI["c"], "source_sha256": SHA["c"], "reason": "blurry",
                      "detail": "sharpness 3.2 < 50"}],
        "funnel": [{"stage": s, "dataset": f"ds-{s}", "input": 10, "kept": 10 - i, "rejected": i}
                   for i, s in enumerate(STAGES)],
        "licenses": {"seen": ["CC-BY-4.0", "CC0-1.0"], "sources_without_license": 1},
        "accounting": {"sources": 3, "used": 2, "rejected": 1, "not_used": 0, "complete": True},
        "verification": {"checked": 7, "mismatches": [
            {"what": "dataset", "path": "data/encoded/manifest.jsonl",
             "expected": "md5-expected", "found": "md5-found"}]},
    }


def test_lineage_html_contains_everything(tmp_path: Path) -> None:
    path = write_lineage_html(tmp_path / "lineage.html", _lineage())
    assert path == tmp_path / "lineage.html" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["lineage.html"]  # no temp file left
    page = path.read_text(encoding="utf-8")
    for name in SHA:
        assert SHA[name][:16] in page and URI[name] in page
    assert "blurry" in page
    for md5 in ("md5-ingest-0001", "md5-filter-0002", "md5-encode-0003"):
        assert md5 in page
    assert "data/encoded/manifest.jsonl" in page and "do not match" in page
    assert page.count('class="badge held"') == 1
    assert "4 clips" in page and "expect_column_values_to_be_between" in page
    manifest = "sha256:" + "f" * 64  # shortened to 16 hex digits, full value in the title
    assert f'<code title="{manifest}">{"f" * 16}</code>' in page


def test_lineage_html_funnel_is_one_inline_svg(tmp_path: Path) -> None:
    page = write_lineage_html(tmp_path / "lineage.html", _lineage()).read_text(encoding="utf-8")
    assert page.count("<svg") == 1
    svg = page[page.index("<svg"):page.index("</svg>")]
    for stage in STAGES:
        assert f"{stage} (ds-{stage})" in svg


def test_lineage_html_escapes_and_stays_offline(tmp_path: Path) -> None:
    page = write_lineage_html(tmp_path / "lineage.html", _lineage()).read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert" not in page
    assert page.count("<script>") == 1  # only the clip-search script
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "<link" not in page and "@import" not in page


def test_lineage_html_sparse_lineage(tmp_path: Path) -> None:
    lineage = _lineage()
    lineage["model"]["registered"] = None
    lineage["accounting"]["complete"] = False
    lineage["verification"] = None
    for key in ("training_runs", "datasets", "sources", "clips", "rejected", "funnel"):
        lineage[key] = []
    page = write_lineage_html(tmp_path / "sub" / "lineage.html", lineage).read_text(
        encoding="utf-8")
    assert "not registered" in page and "not verified" in page
    assert "Accounting incomplete" in page and "<svg" not in page and "<script>" not in page
    # A bare dict still renders, with gaps shown as "—".
    page = write_lineage_html(tmp_path / "bare.html", {}).read_text(encoding="utf-8")
    assert "—" in page and "Accounting incomplete" in page
