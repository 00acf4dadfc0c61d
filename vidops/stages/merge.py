"""Merge: the annotated shards of a fanned-out curation run, as one curated dataset.

Each shard was de-duplicated on its own; near duplicates that landed in different shards
meet here and go through the same dedup as the filter stage. Media are hard-linked, not
copied. The result is validated with the `curated` suite: the dataset training reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from vidops.config import Config
from vidops.data.manifest import rejected_frame
from vidops.media.files import link_or_copy
from vidops.stage import StageContext, StageOutcome, digest_of, run_stage
from vidops.stages.filter import dedup
from vidops.tracking.workdir import Workdir

STAGE = "curated"
MEDIA_COLUMNS = ("path", "keyframe")


def merge_body(ctx: StageContext, in_dirs: list[Path]) -> StageOutcome:
    frames, digests = [], []
    for in_dir in in_dirs:
        manifest = ctx.read_input(in_dir)
        frames.append(manifest.assign(shard_dir=str(in_dir)))
        digests.append(ctx.inputs[-1][1]["dvc"]["md5"])
    merged = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if merged["clip_id"].duplicated().any():
        raise ValueError("the same clip appears in two shards; shards must not overlap")

    with ctx.timed("dedup"):
        kept, duplicates = dedup(merged, ctx.cfg)
    with ctx.timed("link"):
        for row in kept.itertuples(index=False):
            for column in MEDIA_COLUMNS:
                relpath = getattr(row, column, None)
                if isinstance(relpath, str) and relpath:
                    link_or_copy(Path(row.shard_dir) / relpath, ctx.out_dir / relpath)
    return StageOutcome(
        input_count=len(merged),
        kept=kept.drop(columns="shard_dir"),
        rejected=rejected_frame(duplicates),
        input_digest=digest_of(sorted(digests)),
        extra={"shards": [str(p) for p in in_dirs]},
    )


def run_merge(
    in_dirs: list[Path],
    out_dir: Path,
    *,
    cfg: Config,
    workdir: Workdir,
    parent_run_id: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    in_dirs = [Path(p).resolve() for p in in_dirs]
    return run_stage(STAGE, lambda ctx: merge_body(ctx, in_dirs), cfg=cfg, workdir=workdir,
                     out_dir=out_dir, parent_run_id=parent_run_id, quiet=quiet)
