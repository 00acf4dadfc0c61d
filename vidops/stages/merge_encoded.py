"""Merge-encoded: the encoded shards of a DAG as one latent dataset (`encoded`).

Apart from `vidops.stages.encode` so that its task imports no model code: transformers and
diffusers cost a process about 8 s of start-up, which this stage never needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from vidops.config import Config
from vidops.data.latent_cache import (
    EMPTY_CAPTION,
    ENCODE_STAGE,
    ENCODING_JSON,
    VAE_DIR,
    LatentCache,
    export,
)
from vidops.data.manifest import rejected_frame
from vidops.media.files import link_or_copy, link_tree
from vidops.stage import StageContext, StageOutcome, digest_of, run_stage
from vidops.tracking.workdir import Workdir

MERGED = "encoded"


def merge_body(ctx: StageContext, in_dirs: list[Path]) -> StageOutcome:
    """The encoded shards as one dataset: a fresh export of the cache for all their rows.
    Shards encoded with different models or params cannot be one dataset: refused."""
    frames, encodings = [], []
    for in_dir in in_dirs:
        frames.append(ctx.read_input(in_dir))
        encodings.append(json.loads((in_dir / ENCODING_JSON).read_text(encoding="utf-8")))
    identity = [(e["vae"]["digest"], e["text_encoder"]["identity"], e["params"])
                for e in encodings]
    if any(i != identity[0] for i in identity):
        raise ValueError("encoded shards differ in VAE, text encoder or encode params: "
                         + ", ".join(str(d) for d in in_dirs))
    rows = pd.concat(frames, ignore_index=True)
    if rows["clip_id"].duplicated().any():
        raise ValueError("the same clip appears in two encoded shards; shards must not overlap")
    layout = [c for c in rows.columns if c in ("shard", "tensors") or c.endswith(
        ("_shape", "_dtype", "_begin", "_end"))]
    kept = export(LatentCache(ctx.workdir.root / "cache" / ENCODE_STAGE), rows.drop(columns=layout),
                  ctx.out_dir)
    first = in_dirs[0]
    first_run = ctx.inputs[0][1].get("run", {})
    for name in (EMPTY_CAPTION, ENCODING_JSON):
        link_or_copy(first / name, ctx.out_dir / name)
    if (first / VAE_DIR).is_dir():
        link_tree(first / VAE_DIR, ctx.out_dir / VAE_DIR)
    return StageOutcome(input_count=len(rows), kept=kept, rejected=rejected_frame([]),
                        input_digest=digest_of(sorted(f.key for f in rows.itertuples())),
                        extra={"encoding": encodings[0], "shards": [str(d) for d in in_dirs],
                               "run": {"vae": first_run.get("vae", {})}})


def run_merge_encoded(
    in_dirs: list[Path],
    out_dir: Path,
    *,
    cfg: Config,
    workdir: Workdir,
    parent_run_id: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    return run_stage(MERGED, lambda ctx: merge_body(ctx, [Path(d) for d in in_dirs]), cfg=cfg,
                     workdir=workdir, out_dir=out_dir, parent_run_id=parent_run_id,
                     experiment=cfg.tracking.experiments.curation, quiet=quiet)
