"""Evaluate and register: a real tiny model evaluated, registered, gated, served by pyfunc."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from tests.conftest import TinyI3D, make_pretrained
from vidops.cli import main
from vidops.config import Config, load_config
from vidops.models.folder import CARD, TRANSFORMER_WEIGHTS, model_identity
from vidops.stage import GateError, StageError, gate_failures
from vidops.stages.evaluate import METRICS_JSON, REPORT_HTML, evaluate, prompt_cases
from vidops.tracking.registry import CHALLENGER, CHAMPION, register
from vidops.tracking.workdir import Workdir

# c0 and c4 of c0..c9 hash below 0.3: the clips training holds out, evaluation compares with.
OVERRIDES = ["models.vae.bootstrap.steps=4", "models.vae.bootstrap.holdout_clips=1",
             "models.transformer.patch_size=2", "models.transformer.caption_layout_rank=4",
             "train.objective=v_prediction", "train.ema_decay=0", "train.holdout_fraction=0.3",
             "encode.frames=5", "encode.stride=2", "encode.height=32", "encode.width=32",
             "encode.batch_size=4", "train.batch_size=4", "train.steps=30",
             "train.learning_rate=3e-3", "train.warmup_steps=1", "train.checkpoint_every=30",
             "train.log_every=10", "train.sample_prompts=[a red circle moving right]",
             "train.sample_every=0", "train.sampling.steps=4", "evaluate.seeds=[7]",
             "evaluate.batch_size=13",
             # Gates a 30-step model can pass; the regression gate is what these tests probe.
             "registry.thresholds.adherence_colour=null",
             "registry.thresholds.adherence_direction=null",
             "registry.thresholds.temporal_consistency=0.2",
             "registry.max_regression.adherence_colour=null",
             "registry.max_regression.adherence_direction=null",
             "registry.max_regression.adherence_shape=null",
             "registry.max_regression.fd_vae=50.0"]


def _cfg(*extra: str) -> Config:
    return load_config("tiny", [*OVERRIDES, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workdir, Path, Path]:
    """(workdir, a model trained on 8 of 10 clips, its evaluation)."""
    workdir = Workdir.at(tmp_path_factory.mktemp("registry") / "work")
    cfg = _cfg()
    model = make_pretrained(workdir, [(f"c{i}", i, 24) for i in range(10)], cfg,
                            caption="a red circle moving right")
    eval_dir = workdir.evaluations / "pretrain"
    i3d = workdir.root / "i3d.pt"  # a stand-in with the I3D's interface (not shipped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script
        torch.jit.script(TinyI3D()).save(str(i3d))
    evaluate(model, eval_dir, cfg=_cfg(f"evaluate.i3d_path={i3d}"), workdir=workdir,
             quiet=True)
    return workdir, model, eval_dir


def test_prompt_set_asks_every_colour_shape_and_direction_and_the_held_out_combos() -> None:
    cases = prompt_cases(load_config("tiny").evaluate)
    groups = {g: [c for c in cases if c.group == g] for g in ("train", "held_out", "new_concept")}
    assert [len(v) for v in groups.values()] == [32, 12, 8]  # 16 + 6 + 4 prompts, 2 seeds
    words = {w for c in groups["train"] for w in c.prompt.split()}
    assert {"red", "green", "blue", "yellow", "circle", "square", "triangle", "left", "right",
            "up", "down"} <= words
    assert "a blue circle moving up" in {c.prompt for c in groups["held_out"]}
    assert not {c.prompt for c in groups["train"]} & {c.prompt for c in groups["held_out"]}
    assert all("purple" in c.prompt for c in groups["new_concept"])


def test_evaluation_measures_every_video_and_compares_with_held_out_clips(trained: tuple
                                                                          ) -> None:
    workdir, model, eval_dir = trained
    metrics = json.loads((eval_dir / METRICS_JSON).read_text())
    assert len(metrics["videos"]) == 26  # one seed
    card = json.loads((model / CARD).read_text())
    assert card["data"]["held_out"]["clip_ids"] == ["c0", "c4"]
    for row in metrics["videos"]:
        assert (eval_dir / row["file"]).is_file()
        assert np.isfinite(list(row["metrics"].values())).all()
        assert row["adherence"]["read"].keys() == {"colour", "direction", "shape"}
    for ci in metrics["metrics"].values():
        assert ci["ci_low"] <= ci["mean"] <= ci["ci_high"] and ci["n"] == 26
    groups = metrics["adherence"]["by_group"]
    assert {g: v["colour"]["n"] for g, v in groups.items()} == {
        "train": 16, "held_out": 6, "new_concept": 4}
    fd = metrics["distribution"]["fd_vae"]
    assert fd["reference_clips"] == 2 and fd["generated"] == 26 and fd["value"] >= 0
    assert "VAE" in fd["label"]
    fvd = metrics["distribution"]["fvd"]
    assert fvd["reference_clips"] == 2 and fvd["value"] >= 0 and "I3D" in fvd["label"]
    assert "evaluate.clip_model" in metrics["clip_score"]["reason"]
    assert metrics["model"]["digest"] == model_identity(model)
    assert set(metrics["headline"]) >= {"adherence_colour", "fd_vae", "temporal_consistency"}
    report = (eval_dir / REPORT_HTML).read_text()
    assert "<svg" in report and "data:image/gif;base64," in report

    run = MlflowClient(f"sqlite:///{workdir.mlflow_db}").get_run(metrics["mlflow_run_id"])
    assert run.data.metrics["fd_vae"] == pytest.approx(fd["value"])
    assert run.data.tags["vidops.model_digest"] == model_identity(model)


def _degraded(model: Path, out: Path) -> Path:
    """A real, worse model: the trained one with heavy noise in every transformer weight."""
    shutil.copytree(model, out, ignore=shutil.ignore_patterns("checkpoints", "samples"))
    weights = load_file(str(out / TRANSFORMER_WEIGHTS))
    gen = torch.Generator().manual_seed(0)
    save_file({k: v + 2 * v.std().nan_to_num(1.0) * torch.randn(v.shape, generator=gen)
               if v.numel() > 1 else v for k, v in weights.items()},
              str(out / TRANSFORMER_WEIGHTS))
    return out


def test_register_promotes_a_passing_candidate_and_refuses_a_regressing_one(
        trained: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workdir, model, eval_dir = trained
    cfg = _cfg()
    mlflow.set_tracking_uri(f"sqlite:///{workdir.mlflow_db}")
    client = MlflowClient()
    try:
        first = register(model, eval_dir, cfg=cfg, workdir=workdir)
        assert first["passed"] and first["aliases"] == [CHALLENGER, CHAMPION]
        version = client.get_model_version("vidgen", first["version"])
        encoded = json.loads((workdir.stage_dir("encoded") / "stage.json").read_text())
        assert version.tags["vidops.dvc_md5.encoded"] == encoded["dvc"]["md5"]
        assert version.tags["vidops.gx_validation"] == "passed"
        assert float(version.tags["vidops.metric.temporal_consistency"]) == pytest.approx(
            json.loads((eval_dir / METRICS_JSON).read_text())["headline"]
            ["temporal_consistency"], rel=1e-5)

        # The registered model is a pyfunc that turns prompts into videos, on its own files.
        served = mlflow.pyfunc.load_model("models:/vidgen@champion")
        videos = served.predict(pd.DataFrame({"prompt": ["a red circle moving right"] * 2,
                                              "seed": [0, 1]}), params={"steps": 2})
        assert videos.dtype == np.uint8 and videos.shape == (2, 5, 32, 32, 3)
        assert np.abs(videos[0].astype(int) - videos[1]).max() > 0  # its own seed each
        # Unasked, it samples as its evaluation did (the card's 4 steps, guidance 4.5 of the
        # tiny profile it was trained under), not at params.yaml's generic defaults.
        sampled_as = json.loads((eval_dir / METRICS_JSON).read_text())["settings"]
        assert (sampled_as["steps"], sampled_as["guidance_scale"]) == (4, 4.5)
        defaults = {p.name: p.default for p in served.metadata.get_params_schema().params}
        assert {k: defaults[k] for k in ("steps", "guidance_scale", "sampler")} == {
            k: sampled_as[k] for k in ("steps", "guidance_scale", "sampler")}
        out = tmp_path / "champion.mp4"
        capsys.readouterr()
        assert main(["--workdir", str(workdir.root), "--quiet", "generate", "--model",
                     "models:/vidgen@champion", "--prompt", "a red circle moving right",
                     "--out", str(out)]) == 0  # no profile: params.yaml says guidance 6
        assert json.loads(capsys.readouterr().out)["sampling"] == {
            "sampler": "ddim", "steps": 4, "guidance_scale": 4.5}
        assert out.stat().st_size > 0

        # A degraded model, evaluated for real, regresses: challenger, champion unmoved.
        worse = _degraded(model, tmp_path / "worse")
        worse_eval = tmp_path / "worse-eval"
        evaluate(worse, worse_eval, cfg=cfg, workdir=workdir, quiet=True)
        code = main(["--config", "tiny", *[a for o in OVERRIDES for a in ("--set", o)],
                     "--workdir", str(workdir.root), "--quiet", "register", "--model",
                     str(worse), "--eval", str(worse_eval)])
        assert code == 1
        record = client.get_registered_model("vidgen")
        assert str(record.aliases[CHAMPION]) == first["version"]
        assert str(record.aliases[CHALLENGER]) != first["version"]
        refused = client.get_model_version_by_alias("vidgen", CHALLENGER)
        gates = json.loads(refused.tags["vidops.gates"])
        assert any(g["name"].startswith("regression:") and not g["passed"] for g in gates)
        # Its report shows it beside the champion it was compared with.
        assert f"champion (vidgen v{first['version']})" in (worse_eval / REPORT_HTML).read_text()

        # An evaluation of one model does not vouch for another.
        with pytest.raises(StageError, match="evaluated another model"):
            register(worse, eval_dir, cfg=cfg, workdir=workdir)
    finally:
        mlflow.set_tracking_uri(None)


def test_a_model_whose_data_failed_validation_is_refused_unregistered(
        trained: tuple, tmp_path: Path) -> None:
    workdir, model, eval_dir = trained
    tampered = tmp_path / "model"
    shutil.copytree(model, tampered, ignore=shutil.ignore_patterns("checkpoints", "samples"))
    card = json.loads((tampered / CARD).read_text())
    card["data"]["datasets"][0]["validation"] = False  # as if its data had failed GX
    (tampered / CARD).write_text(json.dumps(card))
    client = MlflowClient(f"sqlite:///{workdir.mlflow_db}")
    before = len(client.search_model_versions("name='vidgen'"))
    with pytest.raises(GateError, match="gate data: failed Great Expectations"):
        register(tampered, eval_dir, cfg=_cfg(), workdir=workdir,
                 parent_run_id="pipeline-run-1")
    assert len(client.search_model_versions("name='vidgen'")) == before
    # Recorded as a refused gate of that pipeline run, so `vidops run` exits 1, not 2.
    (failure,) = gate_failures(workdir, "pipeline-run-1")
    assert failure["stage"] == "register" and failure["gate"]["name"] == "data"


@pytest.mark.parametrize(("licenses", "unlicensed", "setting", "refusal"), [
    (["CC-BY-NC-4.0"], 0, "registry.license_deny=[CC-BY-NC-4.0]", "licensed CC-BY-NC-4.0"),
    (["CC-BY-4.0"], 3, "registry.require_license=true", "3 source(s) without a license"),
])
def test_the_license_deny_list_blocks_registration(
        trained: tuple, tmp_path: Path, licenses: list[str], unlicensed: int, setting: str,
        refusal: str) -> None:
    workdir, model, eval_dir = trained
    licensed = tmp_path / "model"
    shutil.copytree(model, licensed, ignore=shutil.ignore_patterns("checkpoints", "samples"))
    card = json.loads((licensed / CARD).read_text())
    # What ingest recorded of the sources the data came from, as lineage_summary carries it.
    card["data"] |= {"licenses": licenses, "sources_without_license": unlicensed}
    (licensed / CARD).write_text(json.dumps(card))
    client = MlflowClient(f"sqlite:///{workdir.mlflow_db}")
    before = len(client.search_model_versions("name='vidgen'"))
    with pytest.raises(GateError, match=f"gate license: .*{re.escape(refusal)}"):
        register(licensed, eval_dir, cfg=_cfg(setting), workdir=workdir)
    assert len(client.search_model_versions("name='vidgen'")) == before
