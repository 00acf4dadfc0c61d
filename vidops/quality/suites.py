"""Great Expectations suites, as code, one per data stage.

Every threshold comes from the Config the stage itself ran with, so a suite can never disagree
with the gates that produced the manifest: a clip the filter kept at `blurry_threshold` passes
the sharpness expectation built from that same value.

Great Expectations is imported lazily (`import_gx`): importing it costs seconds, and most
commands that import `vidops.quality` (through the stage contract) never validate anything.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING, Any

from vidops.config import Config
from vidops.data.manifest import ANNOTATE_COLUMNS, FILTER_COLUMNS

if TYPE_CHECKING:
    import great_expectations as gx
    from great_expectations.expectations import Expectation

SUITE_STAGES: tuple[str, ...] = ("ingest", "filter", "annotate", "curated", "encode", "encoded")
# The encode stage's shards and their merge hold the same table: one suite serves both.
_LATENT_STAGES = ("encode", "encoded")
# Latent-cache keys: sha256 hex (vidops.data.latent_cache.cache_key).
KEY_REGEX = r"^[0-9a-f]{64}$"
SHARD_REGEX = r"^latents/[0-9a-f]{64}\.safetensors$"
SUITE_PREFIX = "vidops-"

SHA256_REGEX = r"^[0-9a-f]{64}$"
# f"{source_sha256[:16]}-{start_frame:06d}-{end_frame:06d}" (vidops.data.manifest).
CLIP_ID_REGEX = r"^[0-9a-f]{16}-\d{6}-\d{6}$"
PHASH_REGEX = r"^[0-9a-f]{16}$"
# H.264 yuv420p needs even dimensions. GX's pandas regex runs on `astype(str)`, so an integer
# column reads "128"; the optional ".0" keeps a float column (ints with a NaN) from failing.
# Non-capturing: pandas warns about match groups in str.contains.
EVEN_REGEX = r"^\d*[02468](?:\.0+)?$"
MOTION_LEVELS = ("low", "medium", "high")

# Ingest accepts whatever a container can describe; these bounds only catch garbage probes.
INGEST_MAX_SIDE = 16384
INGEST_MIN_FPS, INGEST_MAX_FPS = 1.0, 240.0
# Normalised clips: anything outside this is a bug in the filter, not an odd input.
CLIP_MIN_SIDE, CLIP_MAX_SIDE = 16, 8192
# Frame-accurate cuts at the normalised rate still round: half a frame at 10 fps of slack.
DURATION_SLACK_S = 0.05
FPS_SLACK = 0.01


def import_gx() -> ModuleType:
    """great_expectations, with its analytics forced off before the first import.

    Stages run in clusters without egress and in tests with a socket guard: GX must never try
    to phone home, whatever the environment says.
    """
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    import great_expectations

    return great_expectations


def suite_name(stage: str) -> str:
    _check_stage(stage)
    return f"{SUITE_PREFIX}{stage}"


def _check_stage(stage: str) -> None:
    if stage not in SUITE_STAGES:
        raise ValueError(f"no expectation suite for stage {stage!r}; "
                         f"known: {', '.join(SUITE_STAGES)}")


def _columns(stage: str) -> list[str]:
    if stage == "ingest":
        # Imported here, not at module level: vidops.stages.ingest imports the stage contract,
        # which may itself import this package to validate before committing.
        from vidops.stages.ingest import MANIFEST_COLUMNS

        return list(MANIFEST_COLUMNS)
    if stage == "filter":
        return list(FILTER_COLUMNS)
    if stage in _LATENT_STAGES:
        return ["clip_id", "key", "shard", "tensors", "latents_shape", "prompt_embeds_shape",
                "prompt_mask_shape", "caption", "source_sha256"]
    return list(ANNOTATE_COLUMNS)


def _not_null(ex: Any, *columns: str) -> list[Expectation]:
    return [ex.ExpectColumnValuesToNotBeNull(column=c) for c in columns]


def _ingest(ex: Any) -> list[Expectation]:
    return [
        # Null checks on the numeric columns too: a between-expectation skips nulls.
        *_not_null(ex, "id", "source_sha256", "path", "source_uri",
                   "width", "height", "fps", "frame_count", "duration_s"),
        ex.ExpectColumnValuesToBeUnique(column="id"),
        ex.ExpectColumnValuesToMatchRegex(column="source_sha256", regex=SHA256_REGEX),
        ex.ExpectColumnValuesToBeBetween(column="width", min_value=1, max_value=INGEST_MAX_SIDE),
        ex.ExpectColumnValuesToBeBetween(column="height", min_value=1, max_value=INGEST_MAX_SIDE),
        ex.ExpectColumnValuesToBeBetween(column="fps", min_value=INGEST_MIN_FPS,
                                         max_value=INGEST_MAX_FPS),
        ex.ExpectColumnValuesToBeBetween(column="frame_count", min_value=1),
        ex.ExpectColumnValuesToBeBetween(column="duration_s", min_value=0, strict_min=True),
    ]


def _filter(ex: Any, cfg: Config) -> list[Expectation]:
    from great_expectations.expectations.row_conditions import Column

    f = cfg.filter
    short_side = f.normalise.short_side
    fps = f.normalise.fps
    out: list[Expectation] = [
        # A kept-nothing filter means every input was rejected: never something to train on.
        ex.ExpectTableRowCountToBeBetween(min_value=1),
        *_not_null(ex, "clip_id", "source_sha256", "path", "width", "height", "fps",
                   "duration_s", "frames", "sharpness", "motion", "phash"),
        ex.ExpectColumnValuesToBeUnique(column="clip_id"),
        ex.ExpectColumnValuesToMatchRegex(column="clip_id", regex=CLIP_ID_REGEX),
        ex.ExpectColumnValuesToMatchRegex(column="source_sha256", regex=SHA256_REGEX),
    ]
    for side in ("width", "height"):
        out += [
            ex.ExpectColumnValuesToBeBetween(column=side, min_value=CLIP_MIN_SIDE,
                                             max_value=CLIP_MAX_SIDE),
            ex.ExpectColumnValuesToMatchRegex(column=side, regex=EVEN_REGEX),
        ]
    out += [
        # Clips are scaled so their short side is `short_side`, never upscaled: the short side
        # is at most that. min(w, h) <= s  <=>  (h > s  =>  w <= s), which GX can say with a
        # row condition (comparisons with literals only; column-to-column is not expressible).
        ex.ExpectColumnValuesToBeBetween(column="width", max_value=short_side,
                                         row_condition=Column("height") > short_side),
        ex.ExpectColumnValuesToBeBetween(column="fps", min_value=fps - FPS_SLACK,
                                         max_value=fps + FPS_SLACK),
        ex.ExpectColumnValuesToBeBetween(column="duration_s",
                                         min_value=f.min_clip_s - DURATION_SLACK_S,
                                         max_value=f.max_clip_s + DURATION_SLACK_S),
        ex.ExpectColumnValuesToBeBetween(column="frames", min_value=1),
        ex.ExpectColumnValuesToBeBetween(column="sharpness", min_value=f.blurry_threshold),
        ex.ExpectColumnValuesToBeBetween(column="motion", min_value=f.static_threshold),
        ex.ExpectColumnValuesToMatchRegex(column="phash", regex=PHASH_REGEX),
    ]
    return out


def _annotate(ex: Any, cfg: Config) -> list[Expectation]:
    return [
        *_filter(ex, cfg),
        *_not_null(ex, "caption", "keyframe", "face_count", "motion_level"),
        ex.ExpectColumnValueLengthsToBeBetween(column="caption", min_value=1,
                                               max_value=cfg.annotate.max_caption_chars),
        ex.ExpectColumnValuesToBeBetween(column="face_count", min_value=0),
        ex.ExpectColumnValuesToBeInSet(column="motion_level", value_set=list(MOTION_LEVELS)),
    ]


def _latents(ex: Any, cfg: Config) -> list[Expectation]:
    return [
        # No latents means nothing to train on.
        ex.ExpectTableRowCountToBeBetween(min_value=1),
        *_not_null(ex, "clip_id", "key", "shard", "caption", "source_sha256"),
        ex.ExpectColumnValuesToBeUnique(column="clip_id"),
        ex.ExpectColumnValuesToMatchRegex(column="key", regex=KEY_REGEX),
        ex.ExpectColumnValuesToMatchRegex(column="shard", regex=SHARD_REGEX),
        ex.ExpectColumnValueLengthsToBeBetween(column="caption", min_value=1,
                                               max_value=cfg.annotate.max_caption_chars),
    ]


def build_suite(stage: str, cfg: Config, *, expected_rows: int | None = None
                ) -> gx.ExpectationSuite:
    """The expectation suite for a stage's manifest. `curated` (the merged output of the
    sharded curation) carries the annotate columns and is held to the annotate rules.

    expected_rows: the stage's own count of kept rows; the table must have exactly that many,
    so a manifest that lost or duplicated rows on the way to disk cannot pass.
    """
    _check_stage(stage)
    gx = import_gx()
    ex = gx.expectations
    expectations: list[Expectation] = []
    if expected_rows is not None:
        expectations.append(ex.ExpectTableRowCountToEqual(value=int(expected_rows)))
    # exact_match=False: stages may add columns; they may not drop the documented ones.
    expectations.append(ex.ExpectTableColumnsToMatchSet(column_set=_columns(stage),
                                                        exact_match=False))
    if stage == "ingest":
        expectations += _ingest(ex)
    elif stage == "filter":
        expectations += _filter(ex, cfg)
    elif stage in _LATENT_STAGES:
        expectations += _latents(ex, cfg)
    else:
        expectations += _annotate(ex, cfg)
    return gx.ExpectationSuite(
        name=suite_name(stage), expectations=expectations,
        meta={"vidops_stage": stage},
    )
