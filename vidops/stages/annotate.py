"""Annotate: filtered clips in, captioned, tagged clips with keyframes out.

Every clip is decoded once, on all cores, for its keyframe (the middle frame, JPEG), its faces
(OpenCV's Haar cascade on the frames at 1/4, 1/2 and 3/4; with `privacy.blur_faces` also about
four times a second, and then every face region is blurred in a re-encoded clip) and its
colours. Clips that are not re-encoded are hard-linked from the input, so the output holds
every file its rows point to without copying bytes.

Captions, in order of preference: the one the clip arrived with (caption_model "ingest"); one
from the captioner (`annotate.captioner`, or one passed in); one built from the clip's tags when
`annotate.allow_fallback_caption` is set (caption_model "fallback"). A clip left without any is
rejected as `no_caption`, before it is decoded.

motion_level buckets the filter's motion score (mean optical-flow magnitude, analysis-scale
pixels per second) relative to `filter.static_threshold`, below which a clip was rejected as
static: "low" under 4x, "high" over 40x, "medium" between; a missing score gives no level.
With the default threshold (0.25) that is 1 and 10 px/s: on the sample corpora a small shape
crossing a black frame scores 1-2.5 (medium), slow pans over photographs 3-7 (medium), quick
pans 14-23 (high). brightness is the keyframe's mean luma: "dark" under 70, "bright" over
180 (vidops.media.colours). face_count is the most faces found on any one analysed frame and
confirmed on the frame before it (the cascade's false positives rarely survive that), so with
`privacy.blur_faces` (more frames analysed) it can be higher than without. A clip with a
confirmed face has every region the cascade found blurred, confirmed or not: for privacy a
miss costs more than a needless blur.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from vidops.annotation.captioners import Captioner, CaptionerError, load_captioner
from vidops.annotation.clips import (
    KEYFRAME_ANNOTATOR,
    ClipJob,
    ClipResult,
    annotate_clip,
    init_worker,
)
from vidops.config import Config
from vidops.data.manifest import ANNOTATE_COLUMNS, FILTER_COLUMNS, Reason, rejected_frame
from vidops.media import colours, faces
from vidops.stage import STAGE_JSON, StageContext, StageError, StageOutcome, run_stage
from vidops.tracking.workdir import Workdir

STAGE = "annotate"

INGEST = "ingest"
CAPTIONER = "captioner"
FALLBACK = "fallback"
FALLBACK_ANNOTATOR = "vidops-fallback-caption 1"
MOTION_ANNOTATOR = "vidops-motion-level 1"
TAGS_ANNOTATOR = "vidops-tags 1"

# motion_level thresholds, as multiples of filter.static_threshold (module docstring).
LOW_MOTION_BELOW = 4.0
HIGH_MOTION_ABOVE = 40.0

# Below this many clips the work runs inline: a spawned worker takes about a second to start
# (importing PyAV and OpenCV), as long as annotating a few normalised clips.
POOL_MIN_CLIPS = 8
# Results waiting to be collected, per worker: bounds memory when a slow captioner in this
# process falls behind the workers (each result may carry a clip's sampled frames).
INFLIGHT_PER_WORKER = 4

_NEW_COLUMNS = ANNOTATE_COLUMNS[len(FILTER_COLUMNS):]
_STRING_COLUMNS = ["caption", "caption_origin", "caption_model", "keyframe", "dominant_colours",
                   "motion_level", "tags", "annotators", "path"]


def _workers(configured: int, jobs: int) -> int:
    return max(1, min(configured or os.cpu_count() or 1, jobs))


def clean_caption(text: Any, max_chars: int) -> str | None:
    """A caption stripped and cut to max_chars, or None when there is none."""
    if text is None or pd.isna(text):
        return None
    text = str(text).strip()
    return text[:max_chars].rstrip() or None


def motion_level(motion: Any, static_threshold: float) -> str | None:
    """"low", "medium" or "high" for a filter motion score (module docstring); None without one."""
    try:
        score = float(motion)
    except (TypeError, ValueError):
        return None
    if math.isnan(score):
        return None
    if score < LOW_MOTION_BELOW * static_threshold:
        return "low"
    if score > HIGH_MOTION_ABOVE * static_threshold:
        return "high"
    return "medium"


def _and_join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def fallback_caption(brightness_bucket: str, colour_names: list[str], level: str | None,
                     face_count: int) -> str:
    """A plain-words caption from a clip's tags, e.g.
    'a video with mostly blue and white colours, little motion'."""
    adjective = {"dark": "dark ", "bright": "bright "}.get(brightness_bucket, "")
    parts = [f"a {adjective}video"]
    if colour_names:
        parts[0] += f" with mostly {_and_join(colour_names)} colours"
    if level is not None:
        parts.append({"low": "little motion", "medium": "some motion",
                      "high": "a lot of motion"}[level])
    if face_count == 1:
        parts.append("showing a face")
    elif face_count > 1:
        parts.append(f"showing {face_count} faces")
    return ", ".join(parts)


def _input_digest(in_dir: Path) -> str:
    """The input's DVC version when it has one (content of manifest and media), else the
    manifest's sha256."""
    info = json.loads((in_dir / STAGE_JSON).read_text(encoding="utf-8"))
    md5 = (info.get("dvc") or {}).get("md5")
    if md5:
        return f"dvc-md5:{md5}"
    manifest = in_dir / info.get("output", {}).get("manifest", "manifest.parquet")
    return "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()


def _run_jobs(ctx: StageContext, jobs: list[tuple[int, ClipJob]],
              handle: Callable[[int, ClipResult], None]) -> None:
    """Annotate every clip on all cores; results are handled here, in input order."""
    workers = _workers(ctx.cfg.annotate.workers, len(jobs))
    progress = ctx.progress(len(jobs), "clip")
    if workers == 1 or len(jobs) < POOL_MIN_CLIPS:
        for index, job in jobs:
            handle(index, annotate_clip(job))
            progress.update()
    else:
        # spawn: worker processes start clean, whatever threads or connections this one holds.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=init_worker) as pool:
            pending: deque[tuple[int, Future[ClipResult]]] = deque()
            try:
                for index, job in jobs:
                    job = dataclasses.replace(job, threads=1)
                    pending.append((index, pool.submit(annotate_clip, job)))
                    while len(pending) >= workers * INFLIGHT_PER_WORKER:
                        done, future = pending.popleft()
                        handle(done, future.result())
                        progress.update()
                while pending:
                    done, future = pending.popleft()
                    handle(done, future.result())
                    progress.update()
            except BaseException:
                # The stage fails as a whole: do not annotate the clips still queued.
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    progress.close()


def annotate_body(ctx: StageContext, captioner: Captioner | None = None) -> StageOutcome:
    """The stage body. `captioner` overrides `annotate.captioner` (tests, library users)."""
    cfg = ctx.cfg
    manifest = ctx.input_manifest()
    missing = [c for c in FILTER_COLUMNS if c not in manifest.columns]
    if missing:
        raise StageError(f"{ctx.in_dir} is not a filter-stage output: its manifest lacks "
                         f"columns {missing}")
    assert ctx.in_dir is not None
    in_dir = ctx.in_dir
    manifest = manifest[FILTER_COLUMNS].reset_index(drop=True)
    max_chars = cfg.annotate.max_caption_chars
    captioner_spec = cfg.annotate.captioner if captioner is None else captioner.name
    can_caption = captioner is not None or bool(captioner_spec and captioner_spec.strip())

    rejections: list[tuple[int, dict[str, Any]]] = []

    def reject(index: int, reason: Reason, detail: str) -> None:
        row = manifest.iloc[index]
        rejections.append((index, {"id": str(row["clip_id"]), "source_uri": row["source_uri"],
                                   "source_sha256": row["source_sha256"],
                                   "reason": reason.value, "detail": detail}))

    ingest_captions = [clean_caption(text, max_chars) for text in manifest["caption"]]
    # Captions from ingest cut here to annotate.max_caption_chars: counted in stage.json.
    cut_captions = sum(1 for text, cut in zip(manifest["caption"], ingest_captions, strict=True)
                       if cut is not None and len(str(text).strip()) > max_chars)
    jobs: list[tuple[int, ClipJob]] = []
    seen: set[str] = set()
    for index, row in manifest.iterrows():
        i = int(index)
        clip_id = str(row["clip_id"])
        src = (in_dir / str(row["path"])).resolve()
        if clip_id in seen:
            reject(i, Reason.DUPLICATE, f"clip_id {clip_id} is listed more than once")
            continue
        seen.add(clip_id)
        if not src.is_relative_to(in_dir):
            reject(i, Reason.PATH_ESCAPE, f"{row['path']} points outside {in_dir}")
            continue
        needs_caption = ingest_captions[i] is None
        if needs_caption and not can_caption and not cfg.annotate.allow_fallback_caption:
            reject(i, Reason.NO_CAPTION, "no caption from ingest, annotate.captioner is not set "
                                         "and annotate.allow_fallback_caption is false")
            continue
        if not src.is_file():
            reject(i, Reason.UNREADABLE, f"clip file {row['path']} is missing")
            continue
        jobs.append((i, ClipJob(clip_id=clip_id, src=src, out_dir=ctx.out_dir,
                                keyframe_quality=cfg.annotate.keyframe_quality,
                                blur_faces=cfg.privacy.blur_faces,
                                crf=cfg.filter.normalise.crf,
                                want_frames=needs_caption and can_caption)))

    # Loaded only when some clip needs it: a captioning model is gigabytes and seconds to load.
    if captioner is None and can_caption and any(job.want_frames for _, job in jobs):
        try:
            captioner = load_captioner(captioner_spec)
        except CaptionerError as exc:
            raise StageError(str(exc)) from exc

    annotations: dict[int, dict[str, Any]] = {}
    job_by_index = dict(jobs)

    def handle(index: int, result: ClipResult) -> None:
        job = job_by_index[index]
        if result.error is not None:
            reject(index, Reason.UNREADABLE, result.error)
            return
        row = manifest.iloc[index]
        bucket = colours.brightness_bucket(result.brightness)
        level = motion_level(row["motion"], cfg.filter.static_threshold)
        annotators = {"keyframe": KEYFRAME_ANNOTATOR, "faces": faces.DETECTOR,
                      "brightness": colours.BRIGHTNESS_ANNOTATOR,
                      "dominant_colours": colours.ANNOTATOR, "tags": TAGS_ANNOTATOR}
        if level is not None:
            annotators["motion_level"] = MOTION_ANNOTATOR
        if result.faces_blurred:
            annotators["face_blur"] = faces.BLUR

        caption, origin, model = ingest_captions[index], row["caption_origin"], INGEST
        if caption is not None:
            annotators["caption"] = INGEST
        elif captioner is not None:
            try:
                caption = clean_caption(captioner.caption(result.frames or []), max_chars)
            except Exception as exc:
                # A failing model is a setup problem, not a property of the clip: stop the
                # stage rather than reject every clip it touches.
                raise StageError(f"captioner {captioner.name!r} failed on clip "
                                 f"{job.clip_id}: {exc}") from exc
            if caption is not None:
                origin, model = CAPTIONER, captioner.name
                annotators["caption"] = f"{captioner.name} {captioner.version}"
        if caption is None and cfg.annotate.allow_fallback_caption:
            caption = clean_caption(fallback_caption(bucket, result.colours, level,
                                                     result.face_count), max_chars)
            origin = model = FALLBACK
            annotators["caption"] = FALLBACK_ANNOTATOR
        if caption is None:
            for relpath in (job.clip_relpath, job.keyframe_relpath):
                (ctx.out_dir / relpath).unlink(missing_ok=True)
            by = captioner.name if captioner is not None else "no captioner"
            reject(index, Reason.NO_CAPTION, f"no caption from ingest; {by} produced an empty "
                                             "one and annotate.allow_fallback_caption is false")
            return

        tags = [bucket, *result.colours, *([level] if level else []),
                *(["faces"] if result.face_count else [])]
        annotations[index] = {
            "caption": caption, "caption_origin": origin, "caption_model": model,
            "path": job.clip_relpath, "keyframe": job.keyframe_relpath,
            "face_count": result.face_count, "faces_blurred": result.faces_blurred,
            "brightness": result.brightness, "dominant_colours": ",".join(result.colours),
            "motion_level": level, "tags": ",".join(tags),
            "annotators": json.dumps(annotators, sort_keys=True),
        }

    with ctx.timed("annotate"):
        _run_jobs(ctx, jobs, handle)

    order = sorted(annotations)
    kept = manifest.iloc[order].copy()
    for column in ("caption", "caption_origin", "caption_model", "path", *_NEW_COLUMNS):
        kept[column] = [annotations[i][column] for i in order]
    for column in _STRING_COLUMNS:
        kept[column] = kept[column].astype("string")
    kept["face_count"] = kept["face_count"].astype("int64")
    kept["faces_blurred"] = kept["faces_blurred"].astype("bool")
    kept["brightness"] = kept["brightness"].astype("float64")
    kept = kept[ANNOTATE_COLUMNS].reset_index(drop=True)

    rejected = rejected_frame([row for _, row in sorted(rejections, key=lambda r: r[0])])
    models = Counter(str(m) for m in kept["caption_model"])
    return StageOutcome(
        input_count=len(manifest),
        kept=kept,
        rejected=rejected,
        input_digest=_input_digest(in_dir),
        extra={"annotate": {
            "captioner": (f"{captioner.name} {captioner.version}" if captioner is not None
                          else None),
            "captions_by_model": dict(sorted(models.items())),
            "clips_with_faces": int((kept["face_count"] > 0).sum()),
            "clips_face_blurred": int(kept["faces_blurred"].sum()),
            "ingest_captions_truncated": {"count": cut_captions,
                                          "max_caption_chars": max_chars},
        }},
    )


def run_annotate(
    in_dir: Path,
    out_dir: Path,
    *,
    cfg: Config,
    workdir: Workdir,
    parent_run_id: str | None = None,
    quiet: bool = False,
    captioner: Captioner | None = None,
    dataset_name: str | None = None,
) -> dict[str, Any]:
    """Annotate the filter output `in_dir` into `out_dir` under the stage contract; returns
    stage.json. `captioner` overrides `annotate.captioner`; `dataset_name` is the DVC dataset
    (a shard of the curation DAG names its own)."""
    return run_stage(STAGE, lambda ctx: annotate_body(ctx, captioner), cfg=cfg, workdir=workdir,
                     out_dir=out_dir, in_dir=in_dir, parent_run_id=parent_run_id, quiet=quiet,
                     dataset_name=dataset_name)
