"""Pretrain and generate: the training loop, exact resume after SIGKILL, DDP under torchrun,
the model folder, and text-to-video from it.

One small encoded dataset (real H.264 clips, a bootstrapped tiny VAE, MiniLM captions) is
built once per module through the encode stage; everything trains for a few steps on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import make_curated
from vidops import faults
from vidops.config import Config, load_config
from vidops.data.latent_dataset import LatentDataset
from vidops.models.folder import load_model_folder
from vidops.models.sampling import generate
from vidops.models.transformer import build_denoiser
from vidops.stages.encode import run_encode
from vidops.stages.pretrain import TRAINING_JSON, pretrain
from vidops.tracking.workdir import Workdir
from vidops.train.distributed import DistInfo
from vidops.train.loop import Trainer, TrainError

# Pinned here rather than taken from the tiny profile, which is tuned for the demo: these
# tests check the loop's behaviour on a 32x32 latent grid small enough for patch 2.
OVERRIDES = ["models.vae.bootstrap.steps=4", "models.vae.bootstrap.holdout_clips=1",
             "train.holdout_fraction=0",
             "models.transformer.patch_size=2", "train.objective=epsilon",
             "train.min_snr_gamma=null", "train.ema_decay=0.99",
             "encode.frames=9", "encode.stride=1", "encode.height=32", "encode.width=32",
             "encode.batch_size=4", "train.batch_size=4", "train.steps=12",
             "train.warmup_steps=2", "train.checkpoint_every=4", "train.log_every=2",
             "train.learning_rate=1e-3", "train.sample_prompts=[]", "generate.steps=4"]
CAPTIONS = ["a red circle moving left", "a blue square moving right",
            "a green triangle moving up", "a yellow circle moving down"]


def _cfg(*extra: str) -> Config:
    return load_config("tiny", [*OVERRIDES, *extra])


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workdir, Path]:
    workdir = Workdir.at(tmp_path_factory.mktemp("train") / "work")
    specs = [(f"c{i}", i, 24) for i in range(8)]
    curated = make_curated(workdir, specs, _cfg(), caption="clip {seed}")
    info = run_encode(curated, workdir.stage_dir("encoded"), cfg=_cfg(), workdir=workdir,
                      quiet=True)
    return workdir, Path(info["output"]["dir"])


def _cli(workdir: Workdir, *args: str, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    overrides = [x for o in OVERRIDES for x in ("--set", o)]
    return subprocess.run(
        [sys.executable, "-m", "vidops.cli", "--config", "tiny", "--workdir", str(workdir.root),
         "--quiet", *overrides, *args],
        capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def _trainer(data: Path, cfg: Config, out: Path) -> Trainer:
    dataset = LatentDataset(data)
    item = dataset[0]
    channels, frames, height, width = item["latents"].shape
    torch.manual_seed(cfg.seed)
    model = build_denoiser(cfg, latent_channels=channels, latent_frames=frames,
                           latent_hw=(height, width), text_dim=item["prompt_embeds"].shape[-1])
    return Trainer(model, dataset, cfg.train, out_dir=out, seed=cfg.seed,
                   dist=DistInfo(0, 1, 0, torch.device("cpu")),
                   empty_caption=dataset.empty_caption(), settings_digest="test", quiet=True)


def test_loss_decreases_on_a_tiny_overfit_set(encoded: tuple, tmp_path: Path) -> None:
    _, data = encoded
    cfg = _cfg("train.steps=40", "train.log_every=10", "train.caption_dropout=0",
               "train.ema_decay=0")
    result = _trainer(data, cfg, tmp_path / "m").run()
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 4
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("objective, schedule, sampler, extra", [
    ("epsilon", "linear", "ddim", ["train.min_snr_gamma=5.0"]),
    ("epsilon", "squaredcos_cap_v2", "dpm", []),
    ("v_prediction", "squaredcos_cap_v2", "ddim", ["train.min_snr_gamma=5.0"]),
    ("v_prediction", "scaled_linear", "dpm", []),
    ("flow_matching", "squaredcos_cap_v2", "euler", []),
    ("flow_matching", "squaredcos_cap_v2", "dpm", []),
])
def test_objective_and_sampler_combinations_train_and_sample(
        encoded: tuple, tmp_path: Path, objective: str, schedule: str, sampler: str,
        extra: list[str]) -> None:
    _, data = encoded
    cfg = _cfg("train.steps=3", f"train.objective={objective}",
               f"train.beta_schedule={schedule}", f"train.sampling.sampler={sampler}", *extra)
    trainer = _trainer(data, cfg, tmp_path / "m")
    result = trainer.run()
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    from vidops.models.sampling import sample_latents

    dataset = LatentDataset(data)
    item, empty = dataset[0], dataset.empty_caption()
    latents = sample_latents(
        trainer.model.eval(), scheduler_config=trainer.objective.scheduler_config(),
        latent_shape=list(item["latents"].shape), text=item["prompt_embeds"][None],
        mask=item["prompt_mask"][None], uncond_text=empty["prompt_embeds"][None],
        uncond_mask=empty["prompt_mask"][None], seed=0, steps=3, guidance_scale=4.0,
        sampler=sampler)
    assert latents.shape == (1, *item["latents"].shape) and torch.isfinite(latents).all()


def test_a_base_models_scheduler_sets_the_noise_process() -> None:
    """A fine-tune of CogVideoX trains under CogVideoX's own schedule (zero terminal SNR,
    shifted by snr_shift_scale), not a generic one of the same name, and samples with it."""
    from diffusers import CogVideoXDDIMScheduler

    from vidops.train.objectives import Objective, sampler_for

    cogvideox = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0,
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    config = {"_class_name": "CogVideoXDDIMScheduler", **cogvideox.config}
    objective = Objective("v_prediction", beta_schedule="scaled_linear", min_snr_gamma=5.0,
                          scheduler_config=config)
    x0 = torch.randn(64, 4, 2, 3, 3)
    batch = objective.noise(x0, torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    eps = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, 1000, (64,), generator=generator)
    assert torch.allclose(batch.noisy, cogvideox.add_noise(x0, eps, t), atol=1e-6)
    assert torch.allclose(batch.target, cogvideox.get_velocity(x0, eps, t), atol=1e-6)
    assert torch.isfinite(batch.weights).all()  # SNR 0 at the last step: weights stay finite
    assert objective.scheduler_config() == config
    assert isinstance(sampler_for(config, "ddim"), CogVideoXDDIMScheduler)
    with pytest.raises(ValueError, match="predicts 'v_prediction'"):
        Objective("epsilon", scheduler_config=config)


def test_flow_matching_refuses_min_snr(encoded: tuple, tmp_path: Path) -> None:
    _, data = encoded
    with pytest.raises(ValueError, match="min-SNR"):
        _trainer(data, _cfg("train.objective=flow_matching", "train.min_snr_gamma=5.0",
                            "train.sampling.sampler=euler"), tmp_path / "m")


def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(
        encoded: tuple, tmp_path: Path) -> None:
    workdir, data = encoded
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _cli(workdir, "pretrain", "--data", str(data), "--out", str(whole)).returncode == 0

    first = _cli(workdir, "pretrain", "--data", str(data), "--out", str(killed),
                 env={faults.ENV: "train.step@6"})
    assert first.returncode == -9  # SIGKILL, after step 6: the last checkpoint is step 4
    assert not (killed / TRAINING_JSON).exists()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-00000004"]

    again = _cli(workdir, "pretrain", "--data", str(data), "--out", str(killed))
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = (json.loads((d / TRAINING_JSON).read_text()) for d in (whole, killed))
    assert b["resumed_from"] == 4 and a["resumed_from"] is None
    assert a["weights_digest"] == b["weights_digest"]  # bitwise, raw weights
    assert a["losses"][-1] == b["losses"][-1]
    ema = [(d / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
           for d in (whole, killed)]
    assert ema[0] == ema[1]  # and the saved EMA weights too
    assert a["losses"] == b["losses"]  # the whole curve, carried in the checkpoint

    # Re-run once more: resumed from its last checkpoint with nothing left to train (a crash
    # after training, as a pipeline re-run meets it), it reports the same curve and loss.
    done = _cli(workdir, "pretrain", "--data", str(data), "--out", str(killed))
    assert done.returncode == 0, done.stderr[-3000:]
    c = json.loads((killed / TRAINING_JSON).read_text())
    assert c["resumed_from"] == 12 and c["weights_digest"] == a["weights_digest"]
    assert c["losses"] == a["losses"] and c["final_loss"] == a["final_loss"]

    # Asking to resume a run whose settings changed is refused, not silently mixed.
    changed = _cli(workdir, "pretrain", "--data", str(data), "--out", str(killed), "--resume",
                   "--set", "train.learning_rate=5e-4")
    assert changed.returncode == 2 and "other settings" in changed.stderr


def test_torchrun_two_processes_train_the_same_weights(encoded: tuple, tmp_path: Path) -> None:
    """A pipeline task given two GPUs (here: two CPU processes under gloo) trains under
    torchrun through the CLI, and hands back the summary its rank 0 wrote."""
    from vidops.train.launch import JOB_CONFIG, launch_training

    workdir, data = encoded
    out = tmp_path / "ddp"
    cfg = _cfg("train.steps=4", "train.batch_size=2", "resources.pretrain.gpus=2",
               "train.device=cpu")

    def in_this_process() -> dict:
        raise AssertionError("two GPUs must train under torchrun")

    summary = launch_training("pretrain", ["--workdir", str(workdir.root), "--data", str(data),
                                           "--out", str(out), "--parent-run-id", "", "--quiet"],
                              out, cfg, in_this_process)
    assert summary == json.loads((out / TRAINING_JSON).read_text())
    assert summary["world_size"] == 2
    assert len(summary["rank_digests"]) == 2 and summary["ranks_agree"] is True
    # The processes trained under the task's own configuration, written beside the model.
    assert json.loads((out / JOB_CONFIG).read_text())["train"]["steps"] == 4
    # Only rank 0 wrote: one checkpoint directory per save, one model folder.
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004"]
    state = torch.load(out / "checkpoints" / "step-00000004" / "state.pt", weights_only=False)
    assert len(state["rng"]) == 2 and state["data"]["world_size"] == 2


def test_model_folder_generates_a_playable_mp4_and_records_lineage(
        encoded: tuple, tmp_path: Path) -> None:
    workdir, data = encoded
    out = tmp_path / "model"
    summary = pretrain(data, out, cfg=_cfg("train.steps=4"), workdir=workdir, quiet=True)
    card = json.loads((out / "vidops_model.json").read_text())
    _, encode_stage = __import__("vidops.stage", fromlist=["load_output"]).load_output(data)
    assert card["data"]["datasets"][0]["dvc_md5"] == encode_stage["dvc"]["md5"]
    assert {d["stage"] for d in card["data"]["datasets"]} >= {"encode", "fixture"}
    assert card["data"]["clips"] == 8 and card["data"]["sources"] == 8
    assert (out / "transformer" / "config.json").is_file()
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    assert (out / "vae" / "config.json").is_file()
    # The profile's CaptionLayout travels with its Latte.
    assert (out / "layout" / "config.json").is_file()

    run = MlflowClient(tracking_uri=f"sqlite:///{workdir.mlflow_db}").get_run(
        summary["mlflow_run_id"])
    assert "loss" in run.data.metrics and "train.learning_rate" in run.data.params
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [encode_stage["dvc"]["md5"]]

    video_file = tmp_path / "out" / "red.mp4"
    proc = _cli(workdir, "generate", "--model", str(out), "--prompt", "a red circle moving left",
                "--out", str(video_file), "--steps", "3", "--gif", "--seed", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with av.open(str(video_file)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name == "h264"
    assert len(frames) == 9 and frames[0].shape == (32, 32, 3)
    assert video_file.with_suffix(".gif").is_file()

    # The same seed gives the same video, in-process too.
    model = load_model_folder(out)
    assert model.denoiser.layout is not None and model.denoiser.layout.maps.abs().sum() > 0
    a = generate(model, ["a red circle moving left"], seed=1, steps=2, guidance_scale=3.0,
                 sampler="ddim")
    b = generate(model, ["a red circle moving left"], seed=1, steps=2, guidance_scale=3.0,
                 sampler="ddim")
    assert (a == b).all() and a.shape == (1, 9, 32, 32, 3)


def test_too_small_a_dataset_is_a_clear_error(encoded: tuple, tmp_path: Path) -> None:
    _, data = encoded
    with pytest.raises(TrainError, match="too few"):
        _trainer(data, _cfg("train.batch_size=64"), tmp_path / "m")
