"""Ingest: source videos in, a versioned, probed, de-duplicated source dataset out.

Each input is read once: copied into the stage output while its sha256 is computed, then
probed from the copy. Byte-identical inputs keep the first (in source order) and reject the
others as `duplicate`; what cannot be opened or decoded is `unreadable` with the decoder's
message; a media file without a video stream is `no_video`; a file over `ingest.limits`
(bytes, frame size, frame count; checked before any frame is decoded) is `too_large`; paths
that escape their source root are `path_escape` and manifest entries whose URI scheme is not
in `ingest.allowed_schemes` are `unsupported_scheme`, both never read. Kept files are stored
content-addressed (media/<sha[:2]>/<sha><ext>) so names with spaces, non-ASCII letters,
undecodable bytes or clashes cannot matter downstream; the original name stays in the
manifest (undecodable bytes of a file name as "\\xNN", see `sources.safe_text`).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd

from vidops.config import Config
from vidops.data.manifest import Reason, rejected_frame
from vidops.data.sources import Discovery, SourceItem, discover, safe_text
from vidops.media.files import move
from vidops.media.probe import ProbeLimits, copy_hash_probe
from vidops.stage import StageContext, StageOutcome, digest_of, run_stage
from vidops.tracking.workdir import Workdir

STAGE = "ingest"
INCOMING = ".incoming"

MANIFEST_COLUMNS = [
    "id", "source_sha256", "source_uri", "source_name", "source", "path", "size_bytes",
    "container", "codec", "pix_fmt", "width", "height", "fps", "frame_count", "duration_s",
    "has_audio", "bit_rate", "caption", "caption_origin", "license",
    "rotation",  # display rotation, degrees counter-clockwise (filter honours it)
    "caption_truncated",  # the caption was cut to ingest.limits.max_caption_chars
    "caption_note",  # how the caption was altered (truncated, not UTF-8), else null
]


def _uri_id(uri: str) -> str:
    """An id for an input whose bytes were never read (escapes, read errors)."""
    return "uri-" + hashlib.sha256(uri.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def probe_limits(cfg: Config) -> ProbeLimits:
    limits = cfg.ingest.limits
    return ProbeLimits(max_pixels=limits.max_pixels, max_frames=limits.max_frames,
                       max_bytes=limits.max_bytes)


def _workers(configured: int, jobs: int) -> int:
    return max(1, min(configured or os.cpu_count() or 1, jobs))


def _probe_all(ctx: StageContext, items: list[SourceItem]) -> list[dict[str, Any]]:
    """Copy, hash and probe every readable item, on all cores."""
    incoming = ctx.out_dir / INCOMING
    incoming.mkdir()
    jobs = [(i, item) for i, item in enumerate(items) if item.escape is None]
    cov = ctx.cfg.ingest.min_packet_coverage
    limits = probe_limits(ctx.cfg)
    results: list[dict[str, Any]] = [{} for _ in items]
    workers = _workers(ctx.cfg.ingest.workers, len(jobs))
    progress = ctx.progress(len(jobs), "file")
    if workers == 1:
        for i, item in jobs:
            results[i] = copy_hash_probe(item.uri, incoming / str(i), cov, limits=limits)
            progress.update()
    else:
        # spawn: worker processes start clean, whatever threads or connections this one holds.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {i: pool.submit(copy_hash_probe, item.uri, incoming / str(i), cov,
                                      limits=limits)
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
        uri = safe_text(item.uri)  # as recorded: valid UTF-8 whatever the file name's bytes
        if item.escape is not None:
            rejected.append({"id": _uri_id(item.uri), "source_uri": uri,
                             "source_sha256": None, "reason": Reason(item.refusal).value,
                             "detail": safe_text(item.escape)})
            continue
        sha = result["sha256"]
        if result["probe"] is None:
            staged.unlink(missing_ok=True)
            rejected.append({"id": sha or _uri_id(item.uri), "source_uri": uri,
                             "source_sha256": sha,
                             "reason": Reason(result.get("reason") or "unreadable").value,
                             "detail": safe_text(result["error"] or "")})
            continue
        if sha in first_by_sha:
            staged.unlink()
            original = first_by_sha[sha]
            rejected.append({"id": sha, "source_uri": uri, "source_sha256": sha,
                             "reason": Reason.DUPLICATE.value,
                             "detail": f"byte-identical to {safe_text(original.uri)}"})
            continue
        first_by_sha[sha] = item
        # The suffix of the path only: a URL's query (a presigned signature) is no part of it.
        listed = urlsplit(item.name).path if "://" in item.name else item.name
        suffix = Path(listed).suffix.lower() or ".bin"
        relpath = f"media/{sha[:2]}/{sha}{suffix}"
        move(staged, ctx.out_dir / relpath)
        probe = result["probe"]
        kept.append({
            "id": sha, "source_sha256": sha, "source_uri": uri,
            "source_name": safe_text(item.name), "source": safe_text(item.source),
            "path": relpath, "size_bytes": result["size"],
            **{key: probe[key] for key in ("container", "codec", "pix_fmt", "width", "height",
                                           "fps", "frame_count", "duration_s", "has_audio",
                                           "bit_rate")},
            "caption": item.caption, "caption_origin": item.caption_origin,
            "license": item.license, "rotation": int(probe.get("rotation") or 0),
            "caption_truncated": item.caption_truncated, "caption_note": item.caption_note,
        })
    incoming.rmdir()

    kept_frame = pd.DataFrame(kept, columns=MANIFEST_COLUMNS)
    kept_frame = kept_frame.sort_values(["source", "source_name"], kind="stable")
    for column in ("caption", "license", "source_uri", "source_name", "source", "path",
                   "caption_note"):
        kept_frame[column] = kept_frame[column].astype("string")
    kept_frame["rotation"] = kept_frame["rotation"].astype("int64")
    kept_frame["caption_truncated"] = kept_frame["caption_truncated"].astype("bool")
    truncated = [item for item in items if item.caption_truncated]
    return StageOutcome(
        input_count=len(items),
        kept=kept_frame,
        rejected=rejected_frame(rejected),
        input_digest=digest_of([[item.uri, r.get("sha256")]
                                for item, r in zip(items, results, strict=True)]),
        extra={"sources": discovery.sources,
               "ignored_files": {"count": len(discovery.ignored),
                                 "paths": [safe_text(p) for p in discovery.ignored[:1000]]},
               "captions_altered": {
                   "truncated": len(truncated),
                   "max_caption_chars": ctx.cfg.ingest.limits.max_caption_chars,
                   "noted": sum(1 for item in items if item.caption_note)}},
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
    discovery = discover(sources, cfg.ingest.video_extensions, cfg.ingest.default_license,
                         allowed_schemes=cfg.ingest.allowed_schemes,
                         max_caption_chars=cfg.ingest.limits.max_caption_chars)
    return run_stage(STAGE, lambda ctx: ingest_body(ctx, discovery), cfg=cfg, workdir=workdir,
                     out_dir=out_dir, parent_run_id=parent_run_id, quiet=quiet)
