"""Fine-tune: LoRA on vidops' Latte (adapter-only training, diffusers' file format, a model
folder that references its base, resume, merge), and full fine-tuning under DeepSpeed ZeRO-2
on 2 CPU processes.

A base model is pretrained once per module for a few steps on a small encoded dataset; the
fine-tune data are other clips, encoded in that base's latent space as the lifecycle does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
from safetensors.torch import load_file

from tests.conftest import make_curated, make_pretrained
from vidops import faults
from vidops.config import Config, ConfigError, load_config
from vidops.models.folder import (
    apply_lora,
    encode_config_for,
    load_model_folder,
    transformer_digest,
)
from vidops.models.lora import LORA_WEIGHTS
from vidops.models.sampling import generate
from vidops.models.text import TextEncoder, default_text_model_dir
from vidops.stage import StageError
from vidops.stages.encode import run_encode
from vidops.stages.finetune import finetune
from vidops.stages.training import encoded_dataset
from vidops.tracking.workdir import Workdir

OVERRIDES = ["models.vae.bootstrap.steps=4", "models.vae.bootstrap.holdout_clips=1",
             "train.holdout_fraction=0",
             "models.transformer.patch_size=2", "models.transformer.caption_layout_rank=4",
             "train.objective=v_prediction", "train.ema_decay=0",
             "encode.frames=5", "encode.stride=2", "encode.height=32", "encode.width=32",
             "encode.batch_size=4", "train.batch_size=4", "train.steps=4",
             "train.warmup_steps=1", "train.checkpoint_every=4", "train.log_every=2",
             "train.sample_prompts=[]", "generate.steps=3",
             "finetune.train.steps=6", "finetune.train.batch_size=2",
             "finetune.train.warmup_steps=1", "finetune.train.checkpoint_every=2",
             "finetune.train.learning_rate=1e-2", "finetune.lora.rank=4"]


def _cfg(*extra: str) -> Config:
    return load_config("tiny", [*OVERRIDES, *extra])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workdir, Path, Path]:
    """(workdir, the base model folder, fine-tune data encoded in its latent space)."""
    workdir = Workdir.at(tmp_path_factory.mktemp("finetune") / "work")
    cfg = _cfg()
    model = make_pretrained(workdir, [(f"p{i}", i, 24) for i in range(4)], cfg,
                            caption="clip {seed}")
    ft_curated = make_curated(workdir, [(f"f{i}", 100 + i, 24) for i in range(4)], cfg,
                              name="finetune-curated", caption="a purple clip {seed}")
    ft_cfg = encode_config_for(cfg, model)
    ft_data = run_encode(ft_curated, workdir.stage_dir("encoded", "finetune"), cfg=ft_cfg,
                         workdir=workdir, quiet=True)["output"]["dir"]
    return workdir, model, Path(ft_data)


def _video(model_dir: Path, **kwargs) -> np.ndarray:
    model = load_model_folder(model_dir, **kwargs)
    return generate(model, ["a purple clip 100"], seed=0, steps=3, guidance_scale=3.0,
                    sampler="ddim")[0].astype(np.int16)


def test_lora_trains_only_adapters_and_saves_a_model_that_references_its_base(
        base: tuple, tmp_path: Path) -> None:
    workdir, base_dir, data = base
    out = tmp_path / "lora"
    summary = finetune(data, base_dir, out, cfg=_cfg(), workdir=workdir, method="lora",
                       quiet=True)
    assert summary["steps"] == 6 and summary["stage"] == "finetune"

    # Only the adapters trained: the diffusers-format file holds every trainable weight and
    # nothing else, with the transformer prefix diffusers' loaders expect.
    weights = load_file(str(out / "adapter" / LORA_WEIGHTS))
    assert weights and all(k.startswith("transformer.") and ".lora_" in k for k in weights)
    card = json.loads((out / "vidops_model.json").read_text())
    assert card["training"]["trainable_parameters"] == sum(t.numel() for t in weights.values())
    assert card["method"] == "lora" and card["base"]["path"] == str(base_dir)
    assert card["adapter"]["rank"] == 4
    assert card["adapter"]["bytes"] < 0.1 * card["adapter"]["base_transformer_bytes"]
    assert not (out / "transformer").exists()
    assert card["base"]["transformer_digest"] == transformer_digest(base_dir)

    # The folder is a model: it loads its base, applies its adapter; scale 0 is the base.
    tuned, plain = _video(out), _video(base_dir)
    assert np.abs(tuned - plain).max() > 0
    assert np.array_equal(_video(out, lora_scale=0.0), plain)
    # An adapter is not a base to stack another adapter on.
    with pytest.raises(StageError, match="itself a LoRA fine-tune"):
        finetune(data, out, tmp_path / "again", cfg=_cfg(), workdir=workdir, quiet=True)


def test_lora_merge_gives_the_same_model_as_base_plus_adapter(base: tuple, tmp_path: Path
                                                              ) -> None:
    workdir, base_dir, data = base
    out = tmp_path / "merged"
    finetune(data, base_dir, out, cfg=_cfg("finetune.train.steps=2"), workdir=workdir,
             method="lora", merge=True, quiet=True)
    assert (out / "transformer").is_dir() and (out / "adapter" / LORA_WEIGHTS).is_file()
    merged = load_model_folder(out)
    assert not any("lora_" in name for name, _ in merged.denoiser.named_parameters())
    lora = load_model_folder(base_dir)
    apply_lora(lora, out / "adapter")
    latents = torch.randn(1, *merged.latent_shape)
    text, mask = merged.text.encode(["a purple clip 101"])
    t = torch.tensor([500.0])
    with torch.no_grad():
        diff = (merged.denoiser(latents, t, text, mask) - lora.denoiser(latents, t, text, mask))
    assert diff.abs().max() < 1e-4


def test_lora_run_killed_and_resumed_ends_with_the_same_adapter(base: tuple, tmp_path: Path
                                                                 ) -> None:
    workdir, base_dir, data = base
    args = [sys.executable, "-m", "vidops.cli", "--config", "tiny", "--workdir",
            str(workdir.root), "--quiet", *[x for o in OVERRIDES for x in ("--set", o)],
            "finetune", "--data", str(data), "--base", str(base_dir), "--method", "lora"]
    finetune(data, base_dir, tmp_path / "a", cfg=_cfg(), workdir=workdir, method="lora",
             quiet=True)
    killed = subprocess.run([*args, "--out", str(tmp_path / "b")], capture_output=True,
                            text=True, timeout=600, env={**os.environ, faults.ENV: "train.step@3"})
    assert killed.returncode == -9
    resumed = subprocess.run([*args, "--out", str(tmp_path / "b")], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["resumed_from"] == 2
    straight_weights = load_file(str(tmp_path / "a" / "adapter" / LORA_WEIGHTS))
    resumed_weights = load_file(str(tmp_path / "b" / "adapter" / LORA_WEIGHTS))
    assert straight_weights.keys() == resumed_weights.keys()
    assert all(torch.equal(straight_weights[k], resumed_weights[k]) for k in straight_weights)


def test_finetune_refuses_data_outside_the_bases_latent_space(base: tuple, tmp_path: Path
                                                             ) -> None:
    workdir, base_dir, _ = base
    cfg = _cfg("models.vae.bootstrap.steps=3")  # another VAE: another latent space
    curated = make_curated(workdir, [(f"o{i}", 200 + i, 24) for i in range(3)], cfg,
                           name="other-curated", caption="clip {seed}")
    other = run_encode(curated, workdir.stage_dir("encoded", "other"), cfg=cfg,
                       workdir=workdir, quiet=True)["output"]["dir"]
    with pytest.raises(StageError, match=r"does not fit the base model.*VAE"):
        finetune(Path(other), base_dir, tmp_path / "x", cfg=_cfg(), workdir=workdir,
                 method="lora", quiet=True)


def test_sft_with_deepspeed_zero2_on_two_processes_saves_a_model_that_generates(
        base: tuple, tmp_path: Path) -> None:
    workdir, base_dir, data = base
    out = tmp_path / "sft"
    proc = subprocess.run(
        [sys.executable, "-m", "vidops.cli", "--config", "tiny", "--workdir", str(workdir.root),
         "--quiet", *[x for o in OVERRIDES for x in ("--set", o)],
         "--set", "finetune.train.steps=3", "--set", "finetune.train.batch_size=1",
         "finetune", "--data", str(data), "--base", str(base_dir), "--method", "sft",
         "--nproc", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "training.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_agree"]
    # ZeRO-2 partitions the optimizer state: one file per rank in the DeepSpeed checkpoint.
    tag = out / "checkpoints" / "deepspeed" / "step-00000003"
    assert len(list(tag.glob("*optim_states.pt"))) == 2
    card = json.loads((out / "vidops_model.json").read_text())
    assert card["method"] == "sft" and card["deepspeed"]["zero_stage"] == 2
    base_model, tuned = load_model_folder(base_dir), load_model_folder(out)
    changed = [name for (name, a), (_, b) in zip(base_model.denoiser.state_dict().items(),
                                                 tuned.denoiser.state_dict().items(),
                                                 strict=True) if not torch.equal(a, b)]
    assert changed  # full fine-tuning moved the base weights themselves
    video = generate(tuned, ["a purple clip 100"], seed=0, steps=3, guidance_scale=3.0,
                     sampler="ddim")
    assert video.shape == (1, 5, 32, 32, 3)


# CogVideoX-2b's published scheduler (scheduler/scheduler_config.json of THUDM/CogVideoX-2b).
COGVIDEOX_2B_SCHEDULER = {
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True, "set_alpha_to_one": True, "snr_shift_scale": 3.0,
    "steps_offset": 0, "timestep_spacing": "trailing"}


def _tiny_cogvideox_pipeline(out: Path, vae_dir: Path, latent_shape: list[int]) -> Path:
    """A diffusers CogVideoX pipeline folder, as `save_pretrained` writes one, of a random tiny
    transformer (shaped for `latent_shape`), the given VAE, CogVideoX-2b's scheduler and the
    packaged MiniLM in the text encoder's place (no T5 here; the slot takes any encoder)."""
    channels, frames, height, width = latent_shape
    CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=channels,
        out_channels=channels, time_embed_dim=32, text_embed_dim=384, num_layers=1,
        sample_width=width, sample_height=height, sample_frames=frames, patch_size=2,
        temporal_compression_ratio=1, max_text_seq_length=32,
    ).save_pretrained(out / "transformer")
    CogVideoXDDIMScheduler(**COGVIDEOX_2B_SCHEDULER).save_pretrained(out / "scheduler")
    shutil.copytree(vae_dir, out / "vae")
    for part in ("text_encoder", "tokenizer"):
        shutil.copytree(default_text_model_dir(), out / part)
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "CogVideoXPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizerFast"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"]}))
    return out


def test_lora_on_a_cogvideox_pipeline_loads_into_diffusers_and_changes_its_output(
        base: tuple, tmp_path: Path) -> None:
    workdir, base_dir, data = base
    encoding = encoded_dataset(data)[2]
    latent_shape = encoding["latent_shape"]
    pipe_dir = _tiny_cogvideox_pipeline(tmp_path / "tiny-cogvideox", base_dir / "vae",
                                        latent_shape)
    out = tmp_path / "cogvideox-lora"
    finetune(data, str(pipe_dir), out, cfg=_cfg("finetune.train.steps=3"), workdir=workdir,
             method="lora", quiet=True)

    # The pipeline was imported as a base: CogVideoX's own noise schedule, no vidops lineage.
    card = json.loads((out / "vidops_model.json").read_text())
    imported = Path(card["base"]["path"])
    imported_card = json.loads((imported / "vidops_model.json").read_text())
    assert imported_card["kind"] == "imported" and imported_card["data"] is None
    assert imported_card["source"]["path"] == str(pipe_dir)
    assert imported_card["latent"]["shape"] == latent_shape
    transformer = CogVideoXTransformer3DModel.from_pretrained(pipe_dir / "transformer")
    assert imported_card["parameters"] == sum(p.numel() for p in transformer.parameters())
    scheduler = json.loads((imported / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "CogVideoXDDIMScheduler"
    assert scheduler["snr_shift_scale"] == 3.0

    # Only the adapters trained.
    weights = load_file(str(out / "adapter" / LORA_WEIGHTS))
    assert weights and all(k.startswith("transformer.") and ".lora_" in k for k in weights)
    assert card["training"]["trainable_parameters"] == sum(t.numel() for t in weights.values())

    # diffusers' own pipeline takes the adapter file, and it changes what the pipeline makes.
    pipe = CogVideoXPipeline.from_pretrained(pipe_dir)
    text = TextEncoder(pipe_dir, max_length=32)
    prompt, empty = text.encode(["a purple clip 100"])[0], text.encode([""])[0]
    frames, height, width = (encoding["params"][k] for k in ("frames", "height", "width"))

    def run() -> torch.Tensor:
        return pipe(prompt_embeds=prompt, negative_prompt_embeds=empty, num_frames=frames,
                    height=height, width=width, num_inference_steps=2,
                    guidance_scale=3.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).frames

    before = run()
    pipe.load_lora_weights(str(out / "adapter"))
    assert (run() - before).abs().max() > 1e-4
    # The fine-tune folder is a model vidops generates from.
    assert _video(out).shape == (5, 32, 32, 3)


def test_cogvideox_frame_counts_must_be_8n_plus_1() -> None:
    cfg = load_config(Path("configs/cogvideox-2b-lora.yaml"))
    assert cfg.encode.frames == 49
    with pytest.raises(ConfigError, match=r"8N\+1.*got 48, nearest valid: 41 or 49"):
        load_config(Path("configs/cogvideox-2b-lora.yaml"), ["encode.frames=48"])
