"""Compile a pipeline to KFP IR YAML; no cluster is needed."""

from __future__ import annotations

from pathlib import Path

from kfp import compiler

from vidops.config import Config
from vidops.pipelines.registry import PIPELINES


def compile_pipeline(name: str, out_file: Path, cfg: Config) -> Path:
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; available: {', '.join(sorted(PIPELINES))}")
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(PIPELINES[name](cfg), package_path=str(out_file))
    return out_file
