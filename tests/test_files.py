"""Records written whole or not at all (vidops.media.files.write_json_atomic): metrics.json,
registration.json, lineage.json and shard files are read by later steps, possibly in other
processes, and must never be seen half-written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vidops.media.files import write_json_atomic


def test_a_record_replaces_the_previous_one_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"version": 1})
    record = {"version": 2, "caption": "\u00e9t\u00e9"}
    write_json_atomic(path, record)
    assert json.loads(path.read_text(encoding="utf-8")) == record
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_record_that_cannot_be_written_leaves_the_previous_one(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "metrics.json", {"fd_vae": 0.35})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"fd_vae": math.nan}, allow_nan=False)
    assert json.loads(path.read_text(encoding="utf-8")) == {"fd_vae": 0.35}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
