"""Sharding a manifest for the fan-out of the curation DAG.

Shards are balanced by total duration (longest first, each to the lightest shard), since a
shard's cost is its decoding time, not its number of files. Each shard is a small JSON file
listing the source ids it holds; every filter task reads the whole ingest manifest and keeps
the rows of its shard, so no media is copied to fan out.
"""

from __future__ import annotations

import heapq
import json
from pathlib import Path

import pandas as pd

from vidops.media.files import write_json_atomic


def plan_shards(manifest: pd.DataFrame, count: int,
                id_column: str = "source_sha256") -> list[list[str]]:
    """Split the ids (sources, or clips for the encode fan-out) into at most `count` shards of
    near-equal total duration."""
    if count < 1:
        raise ValueError("shard count must be at least 1")
    heap = [(0.0, index) for index in range(count)]
    shards: list[list[str]] = [[] for _ in range(count)]
    order = manifest.sort_values(["duration_s", id_column], ascending=[False, True])
    for sha, duration in zip(order[id_column], order["duration_s"], strict=True):
        load, index = heapq.heappop(heap)
        shards[index].append(str(sha))
        heapq.heappush(heap, (load + float(duration), index))
    # At least one shard, even an empty one, so the DAG still runs and its gates speak.
    return [sorted(shard) for shard in shards if shard] or [[]]


def write_shards(manifest: pd.DataFrame, count: int, dest: Path,
                 source_dir: Path | None = None, id_column: str = "source_sha256",
                 settings: dict[str, str] | None = None) -> list[str]:
    """Write shard-NN.json files into `dest` (atomically each); returns their paths. A shard
    names the stage output it partitions (`source_dir`) and any per-run `settings` of the
    tasks it feeds, so a shard file alone is a task."""
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob("shard-*.json"):
        stale.unlink()
    paths = []
    for index, ids in enumerate(plan_shards(manifest, count, id_column)):
        path = write_json_atomic(dest / f"shard-{index:02d}.json", {
            "index": index, "source_dir": str(source_dir or ""), "id_column": id_column,
            "ids": ids, "settings": settings or {}}, indent=1)
        paths.append(str(path))
    return paths


def shard_settings(path: str | Path) -> dict[str, str]:
    """The per-run settings a shard carries for the tasks it feeds."""
    return dict(json.loads(Path(path).read_text()).get("settings") or {})


def read_shard(path: str | Path) -> tuple[str, set[str], Path | None]:
    """(shard name, ids (of the column the file names), the stage output it partitions)."""
    data = json.loads(Path(path).read_text())
    source = data.get("source_dir") or None
    return (f"shard-{int(data['index']):02d}", set(data["ids"]),
            Path(source) if source else None)
