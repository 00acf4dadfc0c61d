"""Kill `vidops run` at random moments, run it again, and compare the champion's lineage with
an unbroken run's.

    python -m tests.reliability.kill_rerun [--trials N] [--seed S] [--out DIR]

Each trial starts the lifecycle in a fresh workdir, SIGKILLs its whole process group (what a
pod eviction, an OOM kill or a power cut does to the driver and its task subprocesses) at a
random moment of an unbroken run's duration, possibly several times, then lets it finish.
The champion it ends with must have the same lineage as the unbroken run's: the same model
digest, dataset versions (DVC md5s), sources with the same outcome and reasons, and clips
held out. Prints one row per trial; exit 1 when any differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The end-to-end test's tiny lifecycle: a few minutes on two cores.
RUN_SETTINGS = [
    "samples.counts.shapes=4", "models.vae.bootstrap.steps=20", "train.steps=4",
    "train.batch_size=2", "train.sample_prompts=[a red circle moving left]",
    "generate.steps=2", "samples.counts.shapes-finetune=3", "finetune.train.steps=2",
    "finetune.train.batch_size=2", "finetune.lora.rank=2", "evaluate.seeds=[1]",
    "evaluate.prompt_set=custom",
    "evaluate.prompts=[a red circle moving right,a blue square moving up]",
    "registry.thresholds.adherence_colour=null", "registry.thresholds.adherence_direction=null",
    "train.checkpoint_every=1", "finetune.train.checkpoint_every=1",
]


def vidops_command(workdir: Path, settings: list[str], *args: str) -> list[str]:
    """`vidops` on the tiny profile in `workdir`, quiet, with `settings` as --set overrides."""
    sets = [x for s in settings for x in ("--set", s)]
    return [sys.executable, "-m", "vidops.cli", "--config", "tiny", "--workdir", str(workdir),
            "--quiet", *sets, *args]


def _vidops(workdir: Path, *args: str) -> list[str]:
    return vidops_command(workdir, RUN_SETTINGS, *args)


def _run_args(corpus: Path) -> list[str]:
    return ["run", "--source", str(corpus / "shapes"), str(corpus / "defects"),
            "--finetune-source", str(corpus / "shapes-finetune")]


def write_corpus(corpus: Path) -> None:
    """The sample corpora, outside the workdirs: every run reads the same source URIs."""
    for kind, count in (("shapes", 4), ("defects", None), ("shapes-finetune", 3)):
        if not (corpus / kind).is_dir():
            extra = ["--count", str(count)] if count else []
            subprocess.run([sys.executable, "-m", "vidops.cli", "--quiet", "samples",
                            str(corpus / kind), "--kind", kind, *extra], check=True)


def lineage_digest(workdir: Path) -> dict[str, Any]:
    """What must not depend on interruptions: the champion's lineage, less run ids, times
    and paths."""
    out = workdir / "lineage-check"
    subprocess.run(_vidops(workdir, "lineage", "models:/vidgen@champion", "--out", str(out)),
                   check=True, capture_output=True, text=True)
    lineage = json.loads((out / "lineage.json").read_text())
    return {
        "model_digest": lineage["model"]["digest"],
        "datasets": sorted((d["stage"], Path(d["name"]).name, d["dvc_md5"])
                           for d in lineage["datasets"]),
        "sources": sorted((s["source_sha256"], s["status"], s["reason"] or "", s["clips"])
                          for s in lineage["sources"]),
        "clips_held_out": sorted(c["clip_id"] for c in lineage["clips"] if c["held_out"]),
        "accounting": lineage["accounting"],
    }


def run_to_end(workdir: Path, corpus: Path, kill_at: list[float]) -> tuple[int, float]:
    """Run, killing the run's process group at each of `kill_at` (seconds after its start),
    then once more without a kill; returns (kills that landed, seconds in all)."""
    landed, clock = 0, time.monotonic()
    for delay in [*kill_at, None]:
        proc = subprocess.Popen(_vidops(workdir, *_run_args(corpus)), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            landed += 1
            continue
        if delay is None and proc.returncode != 0:
            raise RuntimeError(f"the final run failed ({proc.returncode}): "
                               f"{proc.stderr.read()[-3000:] if proc.stderr else ''}")
    return landed, time.monotonic() - clock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--kills", type=int, default=2, help="kills per trial, at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("kill-rerun"))
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "corpus"
    write_corpus(corpus)

    _, unbroken_s = run_to_end(args.out / "unbroken", corpus, [])
    reference = lineage_digest(args.out / "unbroken")
    print(f"unbroken run: {unbroken_s:.0f} s; champion {reference['model_digest'][:12]}, "
          f"{len(reference['datasets'])} dataset versions, {len(reference['sources'])} sources")
    print("| trial | kill moments (s) | kills landed | total s | same lineage |")
    print("| --- | --- | --- | --- | --- |")
    failures = 0
    for trial in range(1, args.trials + 1):
        moments = sorted(round(rng.uniform(3, unbroken_s * 0.95), 1)
                         for _ in range(rng.randint(1, args.kills)))
        workdir = args.out / f"trial-{trial}"
        landed, total = run_to_end(workdir, corpus, moments)
        got = lineage_digest(workdir)
        same = got == reference
        failures += not same
        print(f"| {trial} | {', '.join(map(str, moments))} | {landed} | {total:.0f} | "
              f"{'yes' if same else 'NO'} |", flush=True)
        if not same:
            (workdir / "lineage-diff.json").write_text(json.dumps(
                {k: {"unbroken": reference[k], "trial": got[k]} for k in reference
                 if reference[k] != got[k]}, indent=1, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
