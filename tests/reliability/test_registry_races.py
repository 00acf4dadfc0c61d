"""Registrations racing for `champion`: on the embedded SQLite store and on an MLflow
tracking server backed by PostgreSQL (as manifests/ deploys it), two `vidops register`
processes started together never both promote from the same champion, the alias ends on
exactly one version that passed its gates, and the store stays whole."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from tests.conftest import make_pretrained
from tests.reliability.servers import mlflow_server, postgres, postgres_bin
from vidops.config import load_config
from vidops.models.folder import TRANSFORMER_WEIGHTS
from vidops.stages.evaluate import evaluate
from vidops.tracking.registry import CHAMPION
from vidops.tracking.workdir import Workdir

pytestmark = pytest.mark.reliability

# A tiny model and a quick evaluation; gates any candidate passes, so both contenders of a
# race are entitled to the champion and only the race decides.
OVERRIDES = ["models.vae.bootstrap.steps=4", "models.vae.bootstrap.holdout_clips=1",
             "models.transformer.patch_size=2", "models.transformer.caption_layout_rank=4",
             "train.holdout_fraction=0.3", "encode.frames=5", "encode.stride=2",
             "encode.height=32", "encode.width=32", "encode.batch_size=4",
             "train.batch_size=4", "train.steps=6", "train.warmup_steps=1",
             "train.checkpoint_every=6", "train.sample_prompts=[]", "train.sample_every=0",
             "generate.steps=2", "evaluate.seeds=[7]", "evaluate.prompt_set=custom",
             "evaluate.prompts=[a red circle moving right,a blue square moving up]",
             "registry.thresholds.adherence_colour=null",
             "registry.thresholds.adherence_direction=null",
             "registry.thresholds.temporal_consistency=null",
             "registry.max_regression.adherence_colour=null",
             "registry.max_regression.adherence_direction=null",
             "registry.max_regression.adherence_shape=null",
             "registry.max_regression.fd_vae=null"]
MODEL = "vidgen"


@pytest.fixture(scope="module")
def contenders(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path]]:
    """Two real, different models, each with its evaluation: (model folder, eval folder).
    c0 and c4 of c0..c9 are held out: the reference clips evaluation compares with."""
    root = tmp_path_factory.mktemp("contenders")
    workdir = Workdir.at(root / "work")
    cfg = load_config("tiny", OVERRIDES)
    first = make_pretrained(workdir, [(f"c{i}", i, 24) for i in range(10)], cfg,
                            caption="a red circle moving right")
    second = root / "second"
    shutil.copytree(first, second, ignore=shutil.ignore_patterns("checkpoints", "samples"))
    weights = load_file(str(second / TRANSFORMER_WEIGHTS))
    gen = torch.Generator().manual_seed(1)
    save_file({k: v + 0.01 * v.std().nan_to_num(1.0) * torch.randn(v.shape, generator=gen)
               if v.numel() > 1 else v for k, v in weights.items()},
              str(second / TRANSFORMER_WEIGHTS))
    pairs = []
    for model in (first, second):
        eval_dir = root / "eval" / model.name
        evaluate(model, eval_dir, cfg=cfg, workdir=workdir, quiet=True)
        pairs.append((model, eval_dir))
    return pairs


def _register(workdir: Path, model: Path, eval_dir: Path, env: dict[str, str]
              ) -> subprocess.Popen[str]:
    sets = [x for o in OVERRIDES for x in ("--set", o)]
    return subprocess.Popen(
        [sys.executable, "-m", "vidops.cli", "--config", "tiny", "--workdir", str(workdir),
         "--quiet", *sets, "register", "--model", str(model), "--eval", str(eval_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **env})


def _race(workdir: Path, contenders: list[tuple[Path, Path]], env: dict[str, str],
          tracking_uri: str, rounds: int) -> dict[str, int]:
    client = MlflowClient(tracking_uri)
    outcomes = {"promoted": 0, "lost": 0}
    for _ in range(rounds):
        procs = [_register(workdir, model, eval_dir, env) for model, eval_dir in contenders]
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            # Promoted (0), or refused because the champion moved under it (1): nothing else.
            assert proc.returncode in (0, 1), err[-3000:]
            if proc.returncode == 1:
                assert "the champion moved" in err, err[-3000:]
            outcomes["promoted" if proc.returncode == 0 else "lost"] += 1
    # Searches leave aliases out: each version is read on its own.
    versions = [client.get_model_version(MODEL, v.version)
                for v in client.search_model_versions(f"name='{MODEL}'")]
    # Every registration made a version (the losers stay challengers); none was lost.
    assert len(versions) == 2 * rounds
    champions = [v for v in versions if CHAMPION in v.aliases]
    assert len(champions) == 1
    assert champions[0].tags["vidops.gates_passed"] == "True"
    promoted = [v for v in versions if "vidops.promoted_from" in v.tags]
    assert len(promoted) == outcomes["promoted"]
    # No lost update: no two promotions replaced the same champion.
    sources = [v.tags["vidops.promoted_from"] for v in promoted]
    assert len(sources) == len(set(sources))
    # The promotions form one chain from no champion to the one standing.
    chain = {v.tags["vidops.promoted_from"]: str(v.version) for v in promoted}
    at = "None"
    while at in chain:
        at = chain[at]
    assert at == str(champions[0].version)
    print(f"registry race ({tracking_uri.split(':')[0]}): {rounds} rounds of 2, {outcomes}")
    return outcomes


@pytest.mark.slow  # two minutes: `make reliability` runs it
def test_registrations_racing_on_sqlite_end_with_one_champion(contenders, tmp_path):
    work = Workdir.at(tmp_path / "work")
    outcomes = _race(work.root, contenders, {},
                     f"sqlite:///{work.mlflow_db}", rounds=2)
    assert outcomes["promoted"] >= 1
    with sqlite3.connect(work.mlflow_db) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.slow
@pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL's server binaries are missing")
def test_registrations_racing_on_a_postgres_mlflow_server_end_with_one_champion(
        contenders, tmp_path):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    with postgres() as database, mlflow_server(database, artifacts) as server:
        outcomes = _race(Workdir.at(tmp_path / "work").root, contenders,
                         {"MLFLOW_TRACKING_URI": server}, server, rounds=3)
    assert outcomes["promoted"] >= 1
