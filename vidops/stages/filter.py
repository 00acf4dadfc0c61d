"""Filter: source videos in, clean, normalised clips out.

1. Hard gates from the ingest metadata, without decoding: too_small, too_short, unsupported.
2. One decode pass per video (vidops.media.analysis) computes sharpness, motion, scene cuts
   and perceptual hashes, splits the video into clips at the cuts, rejects blurry and static
   clips and writes the kept ones normalised. Videos are analysed in parallel, one worker
   process per video, each decoding single-threaded: that is what scales on all cores.
3. Near duplicates across the whole dataset (or shard; the curation DAG's merge repeats it
   across shards): the higher-resolution, then sharper clip is kept.

Accounting is per source video: each is the source of kept clips, or of rejected rows.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vidops.config import Config
from vidops.data.manifest import FILTER_COLUMNS, Reason, rejected_frame
from vidops.data.shards import read_shard
from vidops.media.analysis import (
    AnalysisError,
    AnalysisSettings,
    VideoAnalysis,
    analyse_video,
    thumbnail_distance,
)
from vidops.stage import StageContext, StageOutcome, digest_of, run_stage
from vidops.tracking.workdir import Workdir

STAGE = "filter"
CLIPS = "clips"


def analysis_settings(cfg: Config) -> AnalysisSettings:
    f = cfg.filter
    return AnalysisSettings(
        analysis_short_side=f.analysis_short_side, sample_fps=f.sample_fps,
        scene_threshold=f.scene_threshold, min_scene_s=f.min_scene_s,
        min_clip_s=f.min_clip_s, max_clip_s=f.max_clip_s,
        blurry_threshold=f.blurry_threshold, static_threshold=f.static_threshold,
        out_fps=f.normalise.fps, out_short_side=f.normalise.short_side,
        crf=f.normalise.crf, preset=f.normalise.preset,
        max_pixels=cfg.ingest.limits.max_pixels,
    )


def hard_gate(row: Any, cfg: Config) -> tuple[str, str] | None:
    """(reason, detail) for a source that fails a gate readable from its metadata."""
    f = cfg.filter
    if row.width < f.min_width or row.height < f.min_height:
        return (Reason.TOO_SMALL.value,
                f"{row.width}x{row.height} below the minimum {f.min_width}x{f.min_height}")
    if row.duration_s < f.min_duration_s:
        return (Reason.TOO_SHORT.value,
                f"{row.duration_s:.2f}s below the minimum {f.min_duration_s:.2f}s")
    aspect = max(row.width, row.height) / min(row.width, row.height)
    if aspect > f.max_aspect_ratio:
        return (Reason.UNSUPPORTED.value,
                f"aspect ratio {aspect:.2f} beyond the maximum {f.max_aspect_ratio:.2f}")
    if row.fps < f.min_fps:
        return Reason.UNSUPPORTED.value, f"{row.fps:.2f} fps below the minimum {f.min_fps:.2f}"
    return None


def clip_id(source_sha256: str, start_frame: int, end_frame: int) -> str:
    """Stable across re-runs: the source's content and the cut points."""
    return f"{source_sha256[:16]}-{start_frame:06d}-{end_frame:06d}"


def _hashes(phashes: str) -> np.ndarray:
    return np.array([int(h, 16) for h in phashes.split(",")], dtype=np.uint64)


class _HashIndex:
    """Kept clips' hashes and thumbnails, to find the original a clip nearly duplicates."""

    def __init__(self, cfg: Config) -> None:
        self.limit, self.thumb_limit = cfg.filter.phash_distance, cfg.filter.thumbnail_distance
        self.hashes = np.zeros((0, 3), dtype=np.uint64)
        self.thumbs: list[list[str]] = []
        self.ids: list[str] = []
        self.uris: list[str] = []

    def add(self, clip_id: str, uri: str, phashes: str, thumbnails: str) -> None:
        self.hashes = np.vstack([self.hashes, _hashes(phashes)])
        self.thumbs.append(thumbnails.split(","))
        self.ids.append(clip_id)
        self.uris.append(uri)

    def original_of(self, phashes: str, thumbnails: str) -> str | None:
        """A description of the kept clip this one nearly duplicates, or None. The hashes
        (vectorised over every kept clip) pick the candidates; the thumbnails confirm."""
        if not self.ids:
            return None
        bits = np.bitwise_count(self.hashes ^ _hashes(phashes)).max(axis=1)
        mine = thumbnails.split(",")
        for k in np.flatnonzero(bits <= self.limit):
            gap = max(thumbnail_distance(a, b)
                      for a, b in zip(self.thumbs[k], mine, strict=True))
            if gap <= self.thumb_limit:
                return (f"near duplicate of {self.ids[k]} from {self.uris[k]} (phash distance "
                        f"{int(bits[k])}, thumbnail distance {gap:.3f})")
        return None


def dedup(clips: pd.DataFrame, cfg: Config) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Drop near duplicates: clips whose perceptual hashes (at 25/50/75 % of the clip) are all
    within `phash_distance` bits and whose colour thumbnails are within `thumbnail_distance`
    of a clip already kept. Better clips are visited first, so they are the ones kept."""
    index = _HashIndex(cfg)
    if clips.empty:
        return clips, []
    order = clips.assign(_area=clips.source_width * clips.source_height).sort_values(
        ["_area", "sharpness", "clip_id"], ascending=[False, False, True]).drop(columns="_area")
    kept_rows: list[int] = []
    rejected: list[dict[str, Any]] = []
    for position, row in enumerate(order.itertuples(index=False)):
        original = index.original_of(row.phashes, row.thumbnails)
        if original is not None:
            rejected.append({"id": row.clip_id, "source_uri": row.source_uri,
                             "source_sha256": row.source_sha256,
                             "reason": Reason.NEAR_DUPLICATE.value, "detail": original})
            continue
        kept_rows.append(position)
        index.add(row.clip_id, row.source_uri, row.phashes, row.thumbnails)
    return order.iloc[kept_rows].sort_values("clip_id").reset_index(drop=True), rejected


def relabel_copies(rejected: list[dict[str, Any]], scored: dict[str, tuple[str, str]],
                   kept: pd.DataFrame, cfg: Config) -> None:
    """A blurry or static clip that nearly duplicates a kept clip is first of all a copy (a
    re-encode at low quality is both): it is rejected as near_duplicate, naming the
    original, with the quality verdict kept in the detail."""
    index = _HashIndex(cfg)
    for row in kept.itertuples(index=False):
        index.add(row.clip_id, row.source_uri, row.phashes, row.thumbnails)
    for row in rejected:
        if row["reason"] in (Reason.BLURRY.value, Reason.STATIC.value) and row["id"] in scored:
            original = index.original_of(*scored[row["id"]])
            if original is not None:
                row["detail"] = f"{original}; also {row['reason']}: {row['detail']}"
                row["reason"] = Reason.NEAR_DUPLICATE.value


def _analyse_all(ctx: StageContext, jobs: list[tuple[str, Path]]
                 ) -> list[VideoAnalysis | AnalysisError]:
    settings = analysis_settings(ctx.cfg)
    clips_dir = ctx.out_dir / CLIPS
    clips_dir.mkdir(exist_ok=True)
    workers = max(1, min(ctx.cfg.filter.workers or os.cpu_count() or 1, len(jobs)))
    results: list[VideoAnalysis | AnalysisError] = []
    progress = ctx.progress(len(jobs), "video")

    def collect(get: Any) -> None:
        try:
            results.append(get())
        except AnalysisError as exc:
            results.append(exc)
        progress.update()

    if workers == 1:
        for name, path in jobs:
            collect(lambda n=name, p=path: analyse_video(p, clips_dir, n, settings))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(analyse_video, path, clips_dir, name, settings)
                       for name, path in jobs]
            for future in futures:
                collect(future.result)
    progress.close()
    return results


def filter_body(ctx: StageContext, shard: set[str] | None = None) -> StageOutcome:
    sources = ctx.input_manifest()
    if shard is not None:
        sources = sources[sources.source_sha256.isin(shard)]
    sources = sources.sort_values("source_sha256").reset_index(drop=True)
    assert ctx.in_dir is not None

    rejected: list[dict[str, Any]] = []
    analysed = []
    for row in sources.itertuples(index=False):
        gate = hard_gate(row, ctx.cfg)
        if gate:
            rejected.append({"id": row.source_sha256, "source_uri": row.source_uri,
                             "source_sha256": row.source_sha256, "reason": gate[0],
                             "detail": gate[1]})
        else:
            analysed.append(row)

    with ctx.timed("analyse"):
        results = _analyse_all(ctx, [(row.source_sha256[:16], ctx.in_dir / row.path)
                                     for row in analysed])

    candidates = []
    scored: dict[str, tuple[str, str]] = {}  # rejected clips' hashes, for relabelling
    cut_points: dict[str, list[int]] = {}
    for row, result in zip(analysed, results, strict=True):
        source = {"source_sha256": row.source_sha256, "source_uri": row.source_uri}
        if isinstance(result, AnalysisError):
            # unreadable (decoding failed part-way), unsupported (frame size changes)
            rejected.append({"id": row.source_sha256, **source,
                             "reason": Reason(result.reason).value, "detail": str(result)})
            continue
        cut_points[row.source_sha256] = list(result.cuts)
        if not result.clips:
            rejected.append({"id": row.source_sha256, **source, "reason": Reason.TOO_SHORT.value,
                             "detail": "no scene long enough for a clip"})
        for clip in result.clips:
            cid = clip_id(row.source_sha256, clip.start_frame, clip.end_frame)
            scores = (f"sharpness {clip.sharpness:.1f}, motion {clip.motion:.3f}, "
                      f"{clip.end_s - clip.start_s:.2f}s")
            if clip.reason is not None:
                rejected.append({"id": cid, **source, "reason": clip.reason,
                                 "detail": f"clip {clip.start_frame}-{clip.end_frame}: {scores}"})
                if clip.phashes:
                    scored[cid] = (",".join(clip.phashes), ",".join(clip.thumbnails))
                continue
            relpath = f"{CLIPS}/{cid}.mp4"
            Path(clip.path).rename(ctx.out_dir / relpath)
            candidates.append({
                "clip_id": cid, **source, "source_name": row.source_name,
                "source_width": int(row.width), "source_height": int(row.height),
                "license": row.license, "caption": row.caption,
                "caption_origin": row.caption_origin,
                "scene_index": clip.scene_index, "clip_index": clip.clip_index,
                "start_frame": clip.start_frame, "end_frame": clip.end_frame,
                "start_s": round(clip.start_s, 4), "end_s": round(clip.end_s, 4),
                "duration_s": round(clip.frames / clip.fps, 4) if clip.fps else 0.0,
                "width": clip.width, "height": clip.height, "fps": clip.fps,
                "frames": clip.frames, "sharpness": round(clip.sharpness, 4),
                "motion": round(clip.motion, 5), "frame_diff": round(clip.frame_diff, 4),
                "phash": clip.phash, "phashes": ",".join(clip.phashes),
                "thumbnails": ",".join(clip.thumbnails),
                "mean_r": round(clip.mean_rgb[0], 3), "mean_g": round(clip.mean_rgb[1], 3),
                "mean_b": round(clip.mean_rgb[2], 3), "path": relpath,
            })

    with ctx.timed("dedup"):
        kept, duplicates = dedup(pd.DataFrame(candidates, columns=FILTER_COLUMNS), ctx.cfg)
    for dup in duplicates:
        (ctx.out_dir / CLIPS / f"{dup['id']}.mp4").unlink()
    relabel_copies(rejected, scored, kept, ctx.cfg)
    rejected.extend(duplicates)

    return StageOutcome(
        input_count=len(sources),
        kept=kept[FILTER_COLUMNS],
        rejected=rejected_frame(sorted(rejected, key=lambda r: (r["source_uri"], r["id"]))),
        input_digest=digest_of(sorted(sources.source_sha256.tolist())),
        input_ids=sources.source_sha256.tolist(),
        unit="source_sha256",
        extra={"scene_cuts": cut_points},
    )


def run_filter(
    in_dir: Path,
    out_dir: Path,
    *,
    cfg: Config,
    workdir: Workdir,
    shard_file: str | Path | None = None,
    parent_run_id: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Filter the ingest output in `in_dir` (or one shard of it) into `out_dir`."""
    shard = read_shard(shard_file)[1] if shard_file else None
    return run_stage(STAGE, lambda ctx: filter_body(ctx, shard), cfg=cfg, workdir=workdir,
                     out_dir=out_dir, in_dir=in_dir, parent_run_id=parent_run_id, quiet=quiet)
