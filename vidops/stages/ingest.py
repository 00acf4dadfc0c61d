"""Ingest: source videos in, a versioned, probed, de-duplicated source dataset out.

Each input is read once: copied into the stage output while its sha256 is computed, then
probed from the copy. Byte-identical inputs keep the first (in source order) and reject the
others as `duplicate`; what cannot be opened or decoded is `unreadable` with the decoder's
message; paths that escape their source root are `path_escape` and never read. Kept files
are stored content-addressed (media/<sha[:2]>/<sha><ext>) so names with spaces, non-ASCII
letters or clashes cannot matter downstream; the original name stays in the manifest.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from vidops.config import Config
from vidops.data.manifest import Reason, rejected_frame
from vidops.data.sources import Discovery, SourceItem, discover
from vidops.media.files import move
from vidops.media.probe import copy_hash_probe
from vidops.stage import StageContext, StageOutcome, digest_of, run_stage
from vidops.tracking.workdir import Workdir

STAGE = "ingest"
INCOMING = ".incoming"

MANIFEST_COLUMNS = [
    "id", "source_sha256", "source_uri", "source_name", "source", "path", "size_bytes",
    "container", "codec", "pix_fmt", "width", "height", "fps", "frame_count", "duration_s",
    "has_audio", "bit_rate", "caption", "caption_origin", "license",
]


def _uri_id(uri: str) -> str:
    """An id for an input whose bytes were never read (escapes, read errors)."""
    return "uri-" + hashlib.sha256(uri.encode("utf-8")).hexdigest()[:24]


def _workers(configured: int, jobs: int) -> int:
    return max(1, min(configured or os.cpu_count() or 1, jobs))


def _probe_all(ctx: StageContext, items: list[SourceItem]) -> list[dict[str, Any]]:
    """Copy, hash and probe every readable item, on all cores."""
    incoming = ctx.out_dir / INCOMING
    incoming.mkdir()
    jobs = [(i, item) for i, item in enumerate(items) if item.escape is None]
    cov = ctx.cfg.ingest.min_packet_coverage
    results: list[dict[str, Any]] = [{} for _ in items]
    workers = _workers(ctx.cfg.ingest.workers, len(jobs))
    progress = tqdm(total=len(jobs), desc="ingest", unit="file", disable=ctx.quiet)
    if workers == 1:
        for i, item in jobs:
            results[i] = copy_hash_probe(item.uri, incoming / str(i), cov)
            progress.update()
    else:
        # spawn: worker processes start clean, whatever threads or connections this one holds.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {i: pool.submit(copy_hash_probe, item.uri, incoming / str(i), cov)
                       for i, item in jobs}
            for i, future in futures.items():
                results[i] = future.result()
                progress.update()
    progress.close()
    return results


def ingest_body(ctx: StageContext, discovery: Discovery) -> StageOutcome:
    items = discovery.items
    with ctx.timed("hash_and_probe"):
        results = _probe_all(ctx, items)

    kept: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    first_by_sha: dict[str, SourceItem] = {}
    incoming = ctx.out_dir / INCOMING
    # Visit in rank order so that of byte-identical inputs the original is the one kept.
    for i in sorted(range(len(items)), key=lambda k: items[k].rank):
        item, result = items[i], results[i]
        staged = incoming / str(i)
        if item.escape is not None:
            rejected.append({"id": _uri_id(item.uri), "source_uri": item.uri,
                             "source_sha256": None, "reason": Reason.PATH_ESCAPE.value,
                             "detail": item.escape})
            continue
        sha = result["sha256"]
        if result["probe"] is None:
            staged.unlink(missing_ok=True)
            rejected.append({"id": sha or _uri_id(item.uri), "source_uri": item.uri,
                             "source_sha256": sha, "reason": Reason.UNREADABLE.value,
                             "detail": result["error"]})
            continue
        if sha in first_by_sha:
            staged.unlink()
            original = first_by_sha[sha]
            rejected.append({"id": sha, "source_uri": item.uri, "source_sha256": sha,
                             "reason": Reason.DUPLICATE.value,
                             "detail": f"byte-identical to {original.uri}"})
            continue
        first_by_sha[sha] = item
        suffix = Path(item.name).suffix.lower() or ".bin"
        relpath = f"media/{sha[:2]}/{sha}{suffix}"
        move(staged, ctx.out_dir / relpath)
        probe = result["probe"]
        kept.append({
            "id": sha, "source_sha256": sha, "source_uri": item.uri, "source_name": item.name,
            "source": item.source, "path": relpath, "size_bytes": result["size"],
            **{key: probe[key] for key in ("container", "codec", "pix_fmt", "width", "height",
                                           "fps", "frame_count", "duration_s", "has_audio",
                                           "bit_rate")},
            "caption": item.caption, "caption_origin": item.caption_origin,
            "license": item.license,
        })
    incoming.rmdir()

    kept_frame = pd.DataFrame(kept, columns=MANIFEST_COLUMNS)
    kept_frame = kept_frame.sort_values(["source", "source_name"], kind="stable")
    for column in ("caption", "license", "source_uri", "source_name", "source", "path"):
        kept_frame[column] = kept_frame[column].astype("string")
    return StageOutcome(
        input_count=len(items),
        kept=kept_frame,
        rejected=rejected_frame(rejected),
        input_digest=digest_of([[item.uri, r.get("sha256")]
                                for item, r in zip(items, results, strict=True)]),
        extra={"sources": discovery.sources,
               "ignored_files": {"count": len(discovery.ignored),
                                 "paths": discovery.ignored[:1000]}},
    )


def run_ingest(
    sources: list[str],
    out_dir: Path,
    *,
    cfg: Config,
    workdir: Workdir,
    parent_run_id: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Ingest `sources` into `out_dir` under the stage contract; returns stage.json."""
    discovery = discover(sources, cfg.ingest.video_extensions, cfg.ingest.default_license)
    return run_stage(STAGE, lambda ctx: ingest_body(ctx, discovery), cfg=cfg, workdir=workdir,
                     out_dir=out_dir, parent_run_id=parent_run_id, quiet=quiet)
