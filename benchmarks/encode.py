"""Encode benchmark: the latent cache's re-run cost and encode's memory against dataset size.

    python -m benchmarks.encode [--clips 48] [--config tiny] [--dir DIR]

Builds a curated dataset of `--clips` shapes clips and one twice as large (the same clips
plus as many new ones) as finished stage outputs, then runs `vidops encode` in fresh
processes (each reports its own peak RSS from getrusage) and prints:

1. first encode of the dataset (VAE bootstrapped on the clips, every clip encoded) against a
   second encode of the unchanged dataset: wall time, clips encoded, and the ratio
   (target: the second at most 5 % of the first, zero clips encoded);
2. peak memory of encoding the dataset and the dataset twice as large, each into an empty
   cache with the same (already bootstrapped) VAE, so only the dataset size differs
   (target: at most 10 % growth).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from vidops.config import load_config
from vidops.data.manifest import rejected_frame
from vidops.data.samples import write_samples
from vidops.media.files import link_or_copy
from vidops.stage import StageContext, StageOutcome, run_stage
from vidops.tracking.workdir import Workdir

# Runs one encode in this fresh interpreter and prints its result and peak RSS as JSON.
_CHILD = """
import json, resource, sys, time
from pathlib import Path
from vidops.config import load_config
from vidops.stages.encode import run_encode
from vidops.tracking.workdir import Workdir
profile, work, src, out, *overrides = sys.argv[1:]
start = time.perf_counter()
info = run_encode(Path(src), Path(out), cfg=load_config(profile, overrides),
                  workdir=Workdir.at(work), quiet=True)
print(json.dumps({"wall_s": time.perf_counter() - start,
                  "encoded": info["run"]["encoded"],
                  "cache_hits": info["run"]["cache_hits"],
                  "vae_path": info["run"]["vae"].get("path") or info["encoding"]["vae"].get("path"),
                  "psnr": info["encoding"]["vae"].get("psnr_holdout_db"),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def curated(workdir: Workdir, videos: list[Path], name: str, profile: str) -> Path:
    """A finished stage output holding `videos` as clips with their sidecar captions."""
    def body(ctx: StageContext) -> StageOutcome:
        rows = []
        for video in videos:
            link_or_copy(video, ctx.out_dir / "clips" / video.name)
            rows.append({"clip_id": video.stem, "source_sha256": video.stem,
                         "source_uri": video.as_uri(), "path": f"clips/{video.name}",
                         "caption": video.with_suffix(".txt").read_text().strip(),
                         "duration_s": 3.0, "fps": 24.0})
        return StageOutcome(len(rows), pd.DataFrame(rows), rejected_frame([]), name)

    out = workdir.stage_dir(name)
    run_stage("bench-curated", body, cfg=load_config(profile), workdir=workdir, out_dir=out,
              quiet=True)
    return out


def encode(profile: str, work: Path, src: Path, out: Path, *overrides: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, profile, str(work), str(src), str(out),
                           *overrides], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"encode failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encode",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--config", default="tiny", help="profile (default tiny)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/vidops-bench-encode"))
    args = parser.parse_args(argv)

    shutil.rmtree(args.dir, ignore_errors=True)
    samples = write_samples(args.dir / "samples", "shapes", count=2 * args.clips, seed=0)
    videos = sorted(p for p in samples.out_dir.iterdir() if p.suffix in (".mp4", ".mkv"))
    work = args.dir / "work"
    workdir = Workdir.at(work)
    small = curated(workdir, videos[: args.clips], "curated-1x", args.config)
    large = curated(workdir, videos, "curated-2x", args.config)

    started = time.perf_counter()
    first = encode(args.config, work, small, workdir.stage_dir("encode-first"))
    second = encode(args.config, work, small, workdir.stage_dir("encode-second"))
    pinned = f"models.vae.path={first['vae_path']}"
    mem = {}
    for label, src in (("1x", small), ("2x", large)):
        shutil.rmtree(work / "cache", ignore_errors=True)  # every clip encoded: a cold cache
        mem[label] = encode(args.config, work, src, workdir.stage_dir(f"encode-mem-{label}"),
                            pinned)

    ratio = second["wall_s"] / first["wall_s"]
    growth = mem["2x"]["peak_rss_mb"] / mem["1x"]["peak_rss_mb"] - 1
    print(f"\n{args.clips} shapes clips (and {2 * args.clips}), profile {args.config}; "
          f"bootstrapped VAE held-out PSNR {first['psnr']} dB; "
          f"{time.perf_counter() - started:.0f} s in all")
    print(f"\n{'run':52s} {'wall s':>8s} {'encoded':>8s} {'hits':>6s} {'peak MB':>8s}")
    for label, r in (("first encode (VAE bootstrap + every clip)", first),
                     ("second encode, dataset unchanged", second),
                     (f"cold cache, {args.clips} clips, VAE given", mem["1x"]),
                     (f"cold cache, {2 * args.clips} clips, VAE given", mem["2x"])):
        print(f"{label:52s} {r['wall_s']:8.1f} {r['encoded']:8d} {r['cache_hits']:6d} "
              f"{r['peak_rss_mb']:8.0f}")
    print()
    ok = ratio <= 0.05 and second["encoded"] == 0
    print(f"{'second / first wall time':52s} {ratio:8.3f}   target <= 0.05, 0 encoded: "
          f"{'met' if ok else 'NOT met'}")
    print(f"{'peak memory growth, 2x the clips':52s} {growth:8.3f}   target <= 0.10: "
          f"{'met' if growth <= 0.10 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
