"""Data lineage of a dataset: the chain of stage outputs it was made from.

Every stage output's stage.json names the finished outputs it read (`input.datasets`, with
their DVC md5s and MLflow runs). Walking those links from an encoded dataset back to ingest
gives the dataset versions a model learned from, and the ingest manifest gives the sources
and their licenses. Model cards carry this summary.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from vidops.stage import StageError, load_output


def dataset_chain(data_dir: Path) -> list[tuple[dict[str, Any], Any]]:
    """(stage.json, manifest) of `data_dir` and every output upstream of it, nearest first.
    Each output appears once, however many paths lead to it."""
    seen: set[str] = set()
    chain = []
    queue = [Path(data_dir).resolve()]
    while queue:
        directory = queue.pop(0)
        if str(directory) in seen:
            continue
        seen.add(str(directory))
        try:
            manifest, info = load_output(directory)
        except (StageError, FileNotFoundError):
            continue  # an upstream output since replaced or removed: its md5 is still recorded
        chain.append((info, manifest))
        queue.extend(Path(d["dir"]) for d in info["input"].get("datasets", []))
    return chain


def _manifest_digest(info: dict[str, Any]) -> str:
    path = Path(info["output"]["dir"]) / info["output"]["manifest"]
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def lineage_summary(data_dir: Path) -> dict[str, Any]:
    """What a model card records of the data: dataset versions, clip and source counts,
    and the licenses of the sources that reached the data."""
    chain = dataset_chain(data_dir)
    if not chain:
        raise StageError(f"{data_dir} is not a finished stage output")
    manifest = chain[0][1]
    sources = set(manifest["source_sha256"].astype(str)) if "source_sha256" in manifest else set()
    licenses: set[str] = set()
    unlicensed = 0
    for upstream, upstream_manifest in chain:
        if upstream["stage"] == "ingest" and "license" in upstream_manifest:
            used = upstream_manifest[upstream_manifest["source_sha256"].astype(str).isin(sources)]
            licenses |= {str(x) for x in used["license"].dropna()}
            unlicensed = int(used["license"].isna().sum())
    return {
        "clips": len(manifest),
        "sources": len(sources),
        "licenses": sorted(licenses),
        "sources_without_license": unlicensed,
        "datasets": [{"stage": i["stage"], "dir": i["output"]["dir"], "dvc_md5": i["dvc"]["md5"],
                      "manifest_sha256": _manifest_digest(i),
                      "mlflow_run_id": i["mlflow"]["run_id"],
                      "validation": (i.get("validation") or {}).get("success")}
                     for i, _ in chain],
    }
