"""Prompt-adherence ablation: which settings teach a small model colour AND direction on CPU.

    python -m benchmarks.adherence [--budget 120] [--only NAME ...] [--dir DIR] [--clips N]

Curates the shapes corpus once (`vidops run --pipeline curation`, tiny profile, `--clips`
shapes clips), then for each setting below: encodes the curated clips as that setting asks
(the latent cache serves whatever an earlier setting already encoded), measures its step
time, trains for as many steps as fit `--budget` seconds of training on this machine,
and generates 24 prompts `a {colour} {shape} moving {direction}` (8 of them held-out
combinations, never seen in training), reading colour and direction back from the pixels
(vidops.evaluation.shapes). Prints one row per setting: steps, seconds, colour, direction,
held-out both, and writes the rows (with every prompt's reading) to <dir>/adherence.json.

Every setting is the tiny profile plus the overrides listed; the first row is the profile.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from vidops.config import load_config
from vidops.evaluation.adherence import evaluate_adherence, shapes_prompts
from vidops.models.folder import load_model_folder
from vidops.models.sampling import sampling_settings
from vidops.stages.encode import run_encode
from vidops.stages.pretrain import pretrain
from vidops.tracking.workdir import Workdir

# name -> overrides of the tiny profile. The question each asks is in its name.
SETTINGS: dict[str, list[str]] = {
    "tiny profile": [],
    "plain Latte (no caption layout)": ["models.transformer.caption_layout_rank=0"],
    "short window (stride 2)": ["encode.stride=2"],
    "epsilon, no min-SNR": ["train.objective=epsilon", "train.min_snr_gamma=null"],
    "flow matching": ["train.objective=flow_matching", "train.min_snr_gamma=null",
                      "train.sampling.sampler=euler"],
    "lr 3e-4": ["train.learning_rate=3e-4"],
    "guidance 2": ["train.sampling.guidance_scale=2.0"],
    "guidance 8": ["train.sampling.guidance_scale=8.0"],
    "cogvideox (text in every attention)": ["models.transformer.arch=cogvideox",
                                            "models.transformer.caption_layout_rank=0"],
}


def _curate(work: Path, clips: int) -> Path:
    curated = work / "data" / "curated"
    if (curated / "stage.json").is_file():
        return curated
    proc = subprocess.run(
        [sys.executable, "-m", "vidops.cli", "run", "--pipeline", "curation", "--config", "tiny",
         "--workdir", str(work), "--quiet", "--set", f"samples.counts.shapes={clips}",
         "--set", "samples.kinds=[shapes]"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"curation failed:\n{proc.stderr[-3000:]}")
    return curated


def _steps_for_budget(data: Path, out: Path, overrides: list[str], budget: float,
                      workdir: Workdir) -> tuple[int, float]:
    """Steps that fit `budget` seconds, from a short timed run of the same setting."""
    probe = 12
    cfg = load_config("tiny", [*overrides, f"train.steps={probe}", "train.warmup_steps=1",
                               "train.sample_prompts=[]", f"train.checkpoint_every={probe}",
                               f"train.log_every={probe}"])
    summary = pretrain(data, out, cfg=cfg, workdir=workdir, resume="never", quiet=True)
    per_step = summary["seconds"] / probe
    return max(probe, int(budget / per_step)), per_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=120.0,
                        help="training seconds per setting (default 120: about the "
                        "pretrain time of `make run`)")
    parser.add_argument("--clips", type=int, default=96, help="shapes clips to curate")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/vidops-bench-adherence"))
    parser.add_argument("--only", nargs="*", default=None, help="setting names to run")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        help="an override applied to every setting")
    args = parser.parse_args(argv)

    work = args.dir.resolve()
    workdir = Workdir.at(work)
    curated = _curate(work, args.clips)
    cases = shapes_prompts(24)
    rows = []
    for index, (name, overrides) in enumerate(SETTINGS.items()):
        if args.only and name not in args.only:
            continue
        overrides = [*overrides, *args.extra]
        cfg = load_config("tiny", overrides)
        encoded = run_encode(curated, work / "data" / f"encoded-{index}", cfg=cfg,
                             workdir=workdir, quiet=True)
        data = Path(encoded["output"]["dir"])
        out = work / "models" / f"setting-{index}"
        steps, per_step = _steps_for_budget(data, out, overrides, args.budget, workdir)
        cfg = load_config("tiny", [*overrides, f"train.steps={steps}",
                                   f"train.checkpoint_every={steps}", "train.sample_prompts=[]"])
        clock = time.perf_counter()
        summary = pretrain(data, out, cfg=cfg, workdir=workdir, resume="never", quiet=True)
        model = load_model_folder(out)
        how = sampling_settings(cfg, model.card)
        scores = evaluate_adherence(model, cases, steps=how.steps,
                                    guidance_scale=how.guidance_scale, sampler=how.sampler,
                                    out_dir=out / "adherence")
        row = {"setting": name, "overrides": overrides, "steps": steps,
               "step_s": round(per_step, 4), "train_s": round(summary["seconds"], 1),
               "wall_s": round(time.perf_counter() - clock, 1),
               "final_loss": summary["final_loss"], **scores}
        rows.append(row)
        print(f"{name:40s} steps {steps:5d}  colour {scores['colour']:.2f}  direction "
              f"{scores['direction']:.2f}  held-out both {scores['held_out_both']:.2f}",
              flush=True)
        (work / "adherence.json").write_text(json.dumps(rows, indent=2, default=str))

    print(f"\nprompt adherence at {args.budget:.0f} s of training per setting "
          f"(24 prompts, 8 held-out; tiny profile plus the overrides)\n")
    header = f"{'setting':40s} {'steps':>6s} {'s/step':>7s} {'colour':>7s} {'direction':>9s} " \
             f"{'held-out both':>13s}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['setting']:40s} {row['steps']:6d} {row['step_s']:7.3f} "
              f"{row['colour']:7.2f} {row['direction']:9.2f} {row['held_out_both']:13.2f}")


if __name__ == "__main__":
    main()
