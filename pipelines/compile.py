"""Compile a pipeline to KFP IR YAML; no cluster is needed."""

from __future__ import annotations

from pathlib import Path

from kfp import compiler

from vidops.config import Config
from vidops.pipelines.registry import PIPELINES
from vidops.tracking.redact import refuse_inline_credentials


def compile_pipeline(name: str, out_file: Path, cfg: Config) -> Path:
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; available: {', '.join(sorted(PIPELINES))}")
    # The configuration becomes the compiled pipeline's data (config_json, task settings):
    # credentials reach tasks from Secrets only (kubernetes.secrets), never inline in it.
    refuse_inline_credentials(cfg.to_dict(), where=f"the compiled {name} pipeline")
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(PIPELINES[name](cfg), package_path=str(out_file))
    return out_file
