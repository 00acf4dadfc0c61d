"""Training throughput on this machine's CPU: the tiny and S Latte sizes, and DDP.

    python -m benchmarks.training [--batch 8] [--steps 20]

For each size, one optimizer step of the training loop's model (forward, backward, AdamW)
on latents of the tiny profile's shape with MiniLM-sized captions, timed after warm-up:
step time, samples/s, video tokens/s, and the achieved FLOP/s (FLOPs counted by
torch.utils.flop_counter for one step) against the FLOP/s of a plain matmul of the model's
own MLP shape measured in the same run: the CPU's practical ceiling for this work.

Then the DDP speed-up: the same tiny steps in 2 processes (torch.distributed, gloo, one
thread each, a batch per rank) against 1 process using every core, as samples/s.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

from vidops.config import Config, load_config
from vidops.models.frames import latent_frames
from vidops.models.transformer import LATTE_SIZES, Denoiser, build_denoiser
from vidops.models.vae import VAE_SIZES, spatial_ratio, vae_config

TEXT_DIM = 384  # all-MiniLM-L6-v2, the default text encoder
# tiny as the tiny profile builds it (its patch size and CaptionLayout); S at the Latte
# paper's patch size, on the same latents.
PROFILES: dict[str, Config] = {
    "tiny": load_config("tiny"),
    "S": load_config("tiny", ["models.transformer.size=S", "models.transformer.patch_size=2"]),
}


def _latent_shape(cfg: Config) -> tuple[int, int, int, int]:
    """[C, F, H, W] of the latents the profile's encode stage caches (bootstrapped VAE)."""
    boot, enc = cfg.models.vae.bootstrap, cfg.encode
    ratio = spatial_ratio(vae_config(boot.size, temporal_ratio=boot.temporal_ratio))
    return (VAE_SIZES[boot.size]["latent_channels"],
            latent_frames(enc.frames, boot.temporal_ratio), enc.height // ratio,
            enc.width // ratio)


LATENT = _latent_shape(PROFILES["tiny"])
TEXT = (PROFILES["tiny"].models.text_encoder.max_length, TEXT_DIM)


def _model(size: str) -> Denoiser:
    torch.manual_seed(0)
    return build_denoiser(PROFILES[size], latent_channels=LATENT[0], latent_frames=LATENT[1],
                          latent_hw=(LATENT[2], LATENT[3]), text_dim=TEXT[1])


def _batch(batch: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn((batch, *LATENT), generator=gen),
            torch.rand(batch, generator=gen) * 1000,
            torch.randn((batch, *TEXT), generator=gen),
            torch.ones(batch, TEXT[0], dtype=torch.long))


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          inputs: tuple[torch.Tensor, ...]) -> None:
    latents, t, text, mask = inputs
    loss = (model(latents, t, text, mask) - latents).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _time_steps(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        _step(model, optimizer, inputs)
    start = time.perf_counter()
    for _ in range(steps):
        _step(model, optimizer, inputs)
    return (time.perf_counter() - start) / steps


def _matmul_flops_per_s(rows: int, hidden: int, repeats: int = 20) -> float:
    """FLOP/s of [rows, hidden] @ [hidden, 4 hidden], the MLP's first matmul."""
    a, b = torch.randn(rows, hidden), torch.randn(hidden, 4 * hidden)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    seconds = (time.perf_counter() - start) / repeats
    return 2 * rows * hidden * 4 * hidden / seconds


def measure_size(size: str, batch: int, steps: int) -> dict[str, Any]:
    model = _model(size)
    inputs = _batch(batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with FlopCounterMode(display=False) as counter:
        _step(model, optimizer, inputs)
    flops = counter.get_total_flops()
    step_s = _time_steps(model, inputs, steps)
    tokens = model.tokens_per_sample(LATENT)
    hidden = LATTE_SIZES[size].hidden
    ceiling = _matmul_flops_per_s(batch * tokens, hidden)
    return {"size": size, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "step_s": step_s, "samples_s": batch / step_s, "tokens_s": batch * tokens / step_s,
            "gflops_s": flops / step_s / 1e9, "ceiling_gflops_s": ceiling / 1e9,
            "of_ceiling": flops / step_s / ceiling}


def _ddp_worker(rank: int, world: int, port: int, batch: int, steps: int, box: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(_model("tiny"))
    step_s = _time_steps(model, _batch(batch), steps)
    if rank == 0:
        box.put(step_s)
    dist.destroy_process_group()


def measure_ddp(batch: int, steps: int) -> dict[str, float]:
    single = batch / _time_steps(_model("tiny"), _batch(batch), steps)
    ctx = mp.get_context("spawn")
    box = ctx.SimpleQueue()
    port = 29500 + os.getpid() % 1000
    mp.start_processes(_ddp_worker, args=(2, port, batch, steps, box), nprocs=2, join=True,
                       start_method="spawn")
    double = 2 * batch / box.get()
    return {"one_process_samples_s": single, "two_process_samples_s": double,
            "speedup": double / single}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (S: a quarter)")
    args = parser.parse_args(argv)
    rows = [measure_size("tiny", args.batch, args.steps),
            measure_size("S", args.batch, max(2, args.steps // 4))]
    print(f"\nLatte training step on CPU ({torch.get_num_threads()} threads), batch "
          f"{args.batch}, latents {'x'.join(map(str, LATENT))}, text {TEXT[0]}x{TEXT[1]}, "
          f"patch {PROFILES['tiny'].models.transformer.patch_size} (tiny, with its caption "
          f"layout) / {PROFILES['S'].models.transformer.patch_size} (S)\n")
    header = (f"{'size':5s} {'params':>8s} {'step s':>8s} {'samples/s':>10s} {'tokens/s':>10s} "
              f"{'GFLOP/s':>9s} {'matmul GFLOP/s':>15s} {'of ceiling':>10s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['size']:5s} {r['params_m']:7.1f}M {r['step_s']:8.3f} {r['samples_s']:10.1f} "
              f"{r['tokens_s']:10.0f} {r['gflops_s']:9.1f} {r['ceiling_gflops_s']:15.1f} "
              f"{r['of_ceiling']:10.0%}")
    ddp = measure_ddp(args.batch, args.steps)
    print(f"\nDDP (gloo), tiny: 1 process {ddp['one_process_samples_s']:.1f} samples/s, "
          f"2 processes {ddp['two_process_samples_s']:.1f} samples/s: speed-up "
          f"{ddp['speedup']:.2f}x on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
