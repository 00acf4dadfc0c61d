"""The workdir: where the MLflow store, the DVC repo and remote, and stage outputs live."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import vidops

DEFAULT_WORKDIR = Path("vidops-work")


@dataclass(frozen=True)
class Workdir:
    root: Path

    @classmethod
    def at(cls, path: str | Path | None) -> Workdir:
        root = Path(path if path is not None else DEFAULT_WORKDIR).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def dvc_remote(self) -> Path:
        return self.root / "dvc-remote"

    @property
    def datasets(self) -> Path:
        """Where the `.dvc` pointer files of stage outputs are kept, one per stage."""
        return self.root / "datasets"

    @property
    def models(self) -> Path:
        """Model folders: what pretrain and fine-tune write, VAE bootstraps, imported bases."""
        return self.root / "models"

    @property
    def evaluations(self) -> Path:
        """Evaluation folders (metrics.json, samples, report.html), one per model."""
        return self.root / "eval"

    @property
    def downloads(self) -> Path:
        """Models fetched from MLflow or a hub, kept so a second use does not fetch again."""
        return self.root / "downloads"

    @property
    def run_summary(self) -> Path:
        return self.root / "run-summary.json"

    def stage_dir(self, stage: str, dataset: str = "") -> Path:
        """Default output directory of a stage; `dataset` names a second corpus that runs
        through the same stages beside the first (the lifecycle's fine-tune data)."""
        return self.root / "data" / (f"{dataset}-{stage}" if dataset else stage)

    def samples_dir(self, kind: str) -> Path:
        return self.root / "samples" / kind


def code_version() -> str:
    """Package version plus the git commit it was built from, when that can be known.

    In a container image the commit comes from VIDOPS_GIT_SHA (set at build time); in a
    source checkout from git itself, marked `-dirty` when there are uncommitted changes.
    """
    sha = os.environ.get("VIDOPS_GIT_SHA", "")
    if not sha:
        here = Path(vidops.__file__).resolve().parent
        try:
            sha = subprocess.run(
                ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
                capture_output=True, text=True, check=True, timeout=10,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, check=True, timeout=10,
            ).stdout.strip()
            if dirty:
                sha += "-dirty"
        except (OSError, subprocess.SubprocessError):
            sha = ""
    return f"{vidops.__version__}+{sha}" if sha else vidops.__version__
