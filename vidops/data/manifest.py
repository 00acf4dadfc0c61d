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
