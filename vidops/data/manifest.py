"""Manifest tables: what stages read and write, and the reason codes of rejections."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import pandas as pd


class Reason(str, Enum):
    """Why an input was dropped. README's table documents each code."""

    UNREADABLE = "unreadable"
    UNSUPPORTED = "unsupported"
    DUPLICATE = "duplicate"
    TOO_SMALL = "too_small"
    TOO_SHORT = "too_short"
    BLURRY = "blurry"
    STATIC = "static"
    NEAR_DUPLICATE = "near_duplicate"
    NO_CAPTION = "no_caption"
    # vidops' own: an input path that points outside the source it was listed in.
    PATH_ESCAPE = "path_escape"
    # A manifest entry whose URI scheme is not in ingest.allowed_schemes: never read.
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    # Over one of ingest.limits (bytes, frame size, frame count): never decoded.
    TOO_LARGE = "too_large"
    # A readable media file without a video stream (audio only).
    NO_VIDEO = "no_video"


REJECTED_COLUMNS = ["id", "source_uri", "source_sha256", "reason", "detail"]


def write_table(df: pd.DataFrame, path: Path) -> None:
    """Write a manifest deterministically: same rows, same bytes (DVC md5s depend on it)."""
    df.reset_index(drop=True).to_parquet(path, index=False, engine="pyarrow", compression="zstd")


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path, engine="pyarrow")


def rejected_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=REJECTED_COLUMNS)
    for column in REJECTED_COLUMNS:
        frame[column] = frame[column].astype("string")
    return frame


# Columns of the filter stage's manifest: one row per kept clip.
FILTER_COLUMNS = [
    "clip_id",  # f"{source_sha256[:16]}-{start_frame:06d}-{end_frame:06d}": content + cut points
    "source_sha256", "source_uri", "source_name", "source_width", "source_height", "license",
    "caption", "caption_origin",  # carried over from ingest
    "scene_index", "clip_index", "start_frame", "end_frame", "start_s", "end_s", "duration_s",
    "width", "height", "fps", "frames",  # of the normalised clip
    "sharpness", "motion", "frame_diff",
    "phash", "phashes",  # 16 hex chars; phashes: three hashes joined by ","
    "thumbnails",  # three colour thumbnails (384 bytes in hex each) joined by ","
    "mean_r", "mean_g", "mean_b",
    "path",  # the normalised clip, relative to the stage output (clips/<clip_id>.mp4)
]

# The annotate stage keeps every filter column (caption and caption_origin may be filled in)
# and adds these.
ANNOTATE_COLUMNS = [*FILTER_COLUMNS,
    "caption_model",  # what produced the caption: "ingest", a captioner id, or "fallback"
    "keyframe",  # middle frame as JPEG, relative path (keyframes/<clip_id>.jpg)
    "face_count", "faces_blurred",
    "brightness",  # mean luma of the keyframe, 0-255
    "dominant_colours",  # named colours, "," joined, most frequent first
    "motion_level",  # "low" | "medium" | "high" from the filter's motion score
    "tags",  # "," joined
    "annotators",  # JSON: field -> "name version" that produced it
]
