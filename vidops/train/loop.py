"""The training loop of pretrain and fine-tune: one denoiser, cached latents, one objective.

What it guarantees:
- Determinism. The data order of epoch e is a permutation seeded by (seed, e); the noise,
  timesteps and caption dropout of micro-batch m on rank r come from a generator seeded by
  (seed, m, r). Both are functions of the position alone, so a run resumed from a checkpoint
  draws exactly what the uninterrupted run drew: on CPU the final weights are bitwise equal.
- Checkpoints every `checkpoint_every` steps and at the end (see vidops.train.checkpoint);
  with `resume="auto"` the latest one in the output directory is picked up when its settings
  digest matches, and a mismatch is an error rather than a silent mix of two runs.
- Distributed data parallel under torchrun: each rank reads its own slice of every epoch's
  permutation; gradients are averaged by DDP; only rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import mlflow
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm import tqdm

from vidops import faults
from vidops.config import TrainConfig
from vidops.train import checkpoint as ckpt
from vidops.train.distributed import DistInfo, barrier, gather_objects, mean_across_ranks
from vidops.train.ema import EMA
from vidops.train.objectives import Objective

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
ResumeMode = Literal["auto", "require", "never"]
SampleFn = Callable[[int, torch.nn.Module], None]


DEEPSPEED_DIR = "deepspeed"


def _ds_tag(step: int) -> str:
    return f"step-{step:08d}"


def _prune_deepspeed(checkpoint_dir: Path) -> None:
    """Drop DeepSpeed checkpoints that no kept vidops checkpoint names."""
    kept = {path.name for _, path in ckpt.checkpoints(checkpoint_dir)}
    folder = checkpoint_dir / DEEPSPEED_DIR
    if folder.is_dir():
        for tag in folder.iterdir():
            if tag.is_dir() and tag.name not in kept:
                shutil.rmtree(tag, ignore_errors=True)


def _deepspeed_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler: Any, config: dict[str, Any], dist: DistInfo) -> Any:
    """`model` under a DeepSpeed engine with the loop's own AdamW and LR schedule (so a
    ZeRO run optimises exactly as a DDP one would, only partitioned)."""
    try:
        import deepspeed
    except ImportError as exc:
        raise TrainError("finetune.method sft runs under DeepSpeed, which is not installed: "
                         "pip install 'vidops[deepspeed]'") from exc
    if not torch.distributed.is_initialized():
        raise TrainError("DeepSpeed needs a process group (init_distributed(..., "
                         "always_group=True) makes one)")
    if dist.device.type != "cuda":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (a C++ build, under
        # a file lock a killed build leaves behind) that only its inference kernels use;
        # training's collectives go through the gloo group either way.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if dist.device.type == "cuda" else "gloo")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=config,
                                           dist_init_required=False)
    return engine


class TrainError(RuntimeError):
    """Training cannot start or continue as asked (bad data size, checkpoint mismatch)."""


@dataclass
class TrainResult:
    steps: int
    resumed_from: int | None
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples_per_s: float = 0.0
    tokens_per_s: float = 0.0
    weights_digest: str = ""
    rank_digests: list[str] = field(default_factory=list)
    checkpoint: str | None = None

    @property
    def ranks_agree(self) -> bool:
        return len(set(self.rank_digests)) == 1


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay; biases, norms and embeddings (tables of positions,
    timesteps) do not, as in nanoGPT and DiT."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "embed" in name or "norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(cfg.steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _generator(seed: int, *keys: int) -> torch.Generator:
    value = seed
    for key in keys:
        value = (value * 1_000_003 + key) % (2**62)
    return torch.Generator().manual_seed(value)


class Trainer:
    """Train `denoiser` on `dataset` (LatentDataset items) for `cfg.steps` optimizer steps."""

    def __init__(
        self,
        denoiser: torch.nn.Module,
        dataset: Dataset[dict[str, Any]],
        cfg: TrainConfig,
        *,
        out_dir: Path,
        seed: int,
        dist: DistInfo,
        empty_caption: dict[str, torch.Tensor],
        settings_digest: str,
        latent_scale: float = 1.0,
        sample_fn: SampleFn | None = None,
        resume: ResumeMode = "auto",
        quiet: bool = False,
        deepspeed: dict[str, Any] | None = None,
        scheduler_config: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.seed, self.dist = cfg, seed, dist
        self.dataset = dataset
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / CHECKPOINTS
        self.settings_digest = settings_digest
        self.latent_scale = latent_scale
        self.sample_fn, self.resume, self.quiet = sample_fn, resume, quiet
        self.device = dist.device
        # A fine-tune trains under its base's noise schedule (`scheduler_config`).
        self.objective = Objective.from_config(cfg, scheduler_config)

        self.model = denoiser.to(self.device)
        self.model.train()
        if cfg.gradient_checkpointing and hasattr(self.model.transformer,
                                                  "enable_gradient_checkpointing"):
            self.model.transformer.enable_gradient_checkpointing()
        if self.device.type == "cuda" and cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay),
                                           lr=cfg.learning_rate, betas=cfg.adam_betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.ddp: DistributedDataParallel | None = None
        self.engine: Any = None  # a DeepSpeed engine, when training runs under DeepSpeed
        if deepspeed is not None:
            self.engine = _deepspeed_engine(self.model, self.optimizer, self.scheduler,
                                            deepspeed, dist)
        elif dist.enabled:
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                else None)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.empty = {k: v.to(self.device) for k, v in empty_caption.items()}

        size = len(dataset)
        self.per_rank = size // dist.world_size
        self.micro_per_epoch = self.per_rank // cfg.batch_size
        if self.micro_per_epoch == 0:
            raise TrainError(f"the dataset has {size} clips: too few for batch_size "
                             f"{cfg.batch_size} on {dist.world_size} process(es)")
        self._order: tuple[int, list[int]] | None = None

    # -- data ------------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> list[int]:
        """This rank's slice of epoch `epoch`'s permutation (the remainder is dropped)."""
        if self._order is None or self._order[0] != epoch:
            perm = torch.randperm(len(self.dataset), generator=_generator(self.seed, 7, epoch))
            mine = perm[self.dist.rank:self.per_rank * self.dist.world_size:self.dist.world_size]
            self._order = (epoch, mine.tolist())
        return self._order[1]

    def _batch(self, micro: int) -> dict[str, torch.Tensor]:
        epoch, pos = divmod(micro, self.micro_per_epoch)
        size = self.cfg.batch_size
        rows = [self.dataset[i] for i in self._epoch_order(epoch)[pos * size:(pos + 1) * size]]
        return {key: torch.stack([row[key] for row in rows]).to(self.device)
                for key in rows[0] if isinstance(rows[0][key], torch.Tensor)}

    def _inputs(self, batch: dict[str, torch.Tensor], generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latents = batch["latents"].float()
        if "latents_logvar" in batch:  # a sample of the posterior instead of its mean
            std = (0.5 * batch["latents_logvar"].float()).exp() * self.latent_scale
            latents = latents + std * torch.randn(latents.shape, generator=generator).to(
                latents.device)
        text, mask = batch["prompt_embeds"].float(), batch["prompt_mask"]
        drop = torch.rand(len(latents), generator=generator) < self.cfg.caption_dropout
        if drop.any():
            drop = drop.to(self.device)
            text = torch.where(drop[:, None, None], self.empty["prompt_embeds"].float(), text)
            mask = torch.where(drop[:, None], self.empty["prompt_mask"], mask)
        return latents, text, mask

    # -- checkpoints -----------------------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights training changes. Frozen ones (a LoRA's base) come back from where
        they were loaded, so a checkpoint of a large base stays the size of its adapter."""
        params = dict(self.model.named_parameters())
        return {name: params[name].detach() for name in self.trainable_names}

    def _state(self, step: int) -> dict[str, Any]:
        rngs = gather_objects(self.dist, ckpt.rng_state())
        windows = gather_objects(self.dist, list(self._loss_window))
        deepspeed = self.engine is not None  # then DeepSpeed saves weights and optimizer
        return {
            "step": step,
            "model": None if deepspeed else self._trainable_state(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": None if deepspeed else self.optimizer.state_dict(),
            "lr_scheduler": None if deepspeed else self.scheduler.state_dict(),
            "deepspeed_tag": _ds_tag(step) if deepspeed else None,
            "rng": rngs,
            "data": {"seed": self.seed, "world_size": self.dist.world_size,
                     "batch_size": self.cfg.batch_size,
                     "grad_accumulation": self.cfg.grad_accumulation,
                     "micro_batches_done": step * self.cfg.grad_accumulation,
                     "micro_per_epoch": self.micro_per_epoch},
            "settings_digest": self.settings_digest,
            # The loss curve so far, and each rank's step losses since its last point: a run
            # resumed from here (even from the last step, with nothing left to train) reports
            # the same curve and final loss as an unbroken one.
            "losses": [list(point) for point in self._loss_log],
            "loss_windows": windows,
        }

    def _save(self, step: int) -> Path | None:
        if self.engine is not None:
            # Collective: each rank writes its partition of the optimizer state. The vidops
            # checkpoint that names this tag is written after it, so a kill in between
            # leaves the previous checkpoint as the latest complete one.
            self.engine.save_checkpoint(str(self.checkpoint_dir / DEEPSPEED_DIR),
                                        tag=_ds_tag(step), save_latest=False)
        state = self._state(step)  # collective: every rank contributes its RNG states
        path = None
        if self.dist.is_main:
            path = ckpt.save(self.checkpoint_dir, step, state, self.cfg.keep_checkpoints)
            if self.engine is not None:
                _prune_deepspeed(self.checkpoint_dir)
        barrier(self.dist)
        return path

    def _restore(self) -> int | None:
        if self.resume == "never":
            if self.dist.is_main:
                shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            barrier(self.dist)
            return None
        path = ckpt.latest(self.checkpoint_dir)
        if path is None:
            if self.resume == "require":
                raise TrainError(f"--resume: no checkpoint in {self.checkpoint_dir}")
            return None
        state = ckpt.load(path)
        if state["settings_digest"] != self.settings_digest:
            raise TrainError(
                f"{path} was written by a run with other settings (data, model or training "
                "config); resume it with the same ones, or start afresh with --no-resume")
        if state["data"]["world_size"] != self.dist.world_size:
            raise TrainError(f"{path} was written by {state['data']['world_size']} processes; "
                             f"resume with the same number, not {self.dist.world_size}")
        if self.engine is not None:
            self.engine.load_checkpoint(str(self.checkpoint_dir / DEEPSPEED_DIR),
                                        tag=state["deepspeed_tag"])
        else:
            missing = set(self.trainable_names) - set(state["model"])
            if missing:
                raise TrainError(f"{path} lacks {len(missing)} of this model's trainable "
                                 f"weights (e.g. {sorted(missing)[0]})")
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name in self.trainable_names:
                    params[name].copy_(state["model"][name])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        ckpt.set_rng_state(state["rng"][self.dist.rank])
        self._loss_log = [(int(n), float(v)) for n, v in state.get("losses", [])]
        windows = state.get("loss_windows") or []
        self._loss_window = ([float(v) for v in windows[self.dist.rank]]
                             if self.dist.rank < len(windows) else [])
        log.info("resumed from %s (step %d)", path, state["step"])
        return int(state["step"])

    # -- the loop --------------------------------------------------------------------------

    @contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.device.type == "cuda" and self.cfg.mixed_precision != "no":
            dtype = torch.bfloat16 if self.cfg.mixed_precision == "bf16" else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                yield
        else:
            yield

    def run(self) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        self._loss_log: list[tuple[int, float]] = []
        self._loss_window: list[float] = []
        resumed = self._restore()
        start = resumed or 0
        result = TrainResult(steps=cfg.steps, resumed_from=resumed, seconds=0.0,
                             losses=self._loss_log)
        network = self.engine or self.ddp or self.model
        scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda"
                                      and cfg.mixed_precision == "fp16")
        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step",
                   disable=self.quiet or not dist.is_main)
        window = self._loss_window
        tokens_per_sample = 0
        clock, done = time.perf_counter(), 0
        for step in range(start, cfg.steps):
            step_loss = 0.0
            for k in range(cfg.grad_accumulation):
                micro = step * cfg.grad_accumulation + k
                batch = self._batch(micro)
                generator = _generator(self.seed, 11, micro, dist.rank)
                latents, text, mask = self._inputs(batch, generator)
                tokens_per_sample = self.model.tokens_per_sample(latents.shape[1:])
                noised = self.objective.noise(latents, generator)
                if self.engine is not None:
                    # DeepSpeed averages over the accumulation itself, clips, and steps the
                    # optimizer and LR schedule at the boundary.
                    loss = self.objective.loss(network(noised.noisy, noised.timesteps, text,
                                                       mask), noised)
                    self.engine.backward(loss)
                    self.engine.step()
                    step_loss += float(loss.detach()) / cfg.grad_accumulation
                    continue
                last = k == cfg.grad_accumulation - 1
                sync = nullcontext() if last or self.ddp is None else self.ddp.no_sync()
                with sync:
                    with self._autocast():
                        prediction = network(noised.noisy, noised.timesteps, text, mask)
                    loss = self.objective.loss(prediction, noised) / cfg.grad_accumulation
                    scaler.scale(loss).backward()
                step_loss += float(loss.detach())
            if self.engine is not None:
                grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
            else:
                scaler.unscale_(self.optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable,
                                                                 cfg.max_grad_norm))
                scaler.step(self.optimizer)
                scaler.update()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.model)
            done += 1
            window.append(step_loss)
            number = step + 1

            if number % cfg.log_every == 0 or number == cfg.steps:
                loss_mean = mean_across_ranks(dist, sum(window) / len(window))
                elapsed = time.perf_counter() - clock
                samples = done * cfg.batch_size * cfg.grad_accumulation * dist.world_size
                metrics = {"loss": loss_mean, "lr": self.scheduler.get_last_lr()[0],
                           "grad_norm": grad_norm, "samples_per_s": samples / elapsed,
                           "tokens_per_s": samples * tokens_per_sample / elapsed}
                result.losses.append((number, loss_mean))
                if dist.is_main:
                    if mlflow.active_run() is not None:
                        mlflow.log_metrics(metrics, step=number)
                    bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{metrics['lr']:.2e}")
                window.clear()
            bar.update(1)
            if number % cfg.checkpoint_every == 0 and number != cfg.steps:
                self._save(number)
            faults.point("train.step")
            if (self.sample_fn is not None and dist.is_main and cfg.sample_every
                    and number % cfg.sample_every == 0 and number != cfg.steps):
                self._sample(number)
        bar.close()

        result.seconds = time.perf_counter() - clock
        samples = done * cfg.batch_size * cfg.grad_accumulation * dist.world_size
        if done:
            result.samples_per_s = samples / result.seconds
            result.tokens_per_s = samples * tokens_per_sample / result.seconds
        final = self._save(cfg.steps)
        result.checkpoint = str(final) if final else None
        result.rank_digests = gather_objects(dist, weights_digest(self.model))
        result.weights_digest = result.rank_digests[0]
        if self.sample_fn is not None and dist.is_main:
            self._sample(cfg.steps)
        return result

    def _sample(self, step: int) -> None:
        assert self.sample_fn is not None
        was_training = self.model.training
        self.model.eval()
        with self.ema.applied(self.model) if self.ema else nullcontext(self.model) as model:
            self.sample_fn(step, model)
        self.model.train(was_training)

    def final_model(self) -> torch.nn.Module:
        """The weights to save: the EMA's when EMA is on (copied into the model). Under
        DeepSpeed, first the final ZeRO checkpoint consolidated into full fp32 weights (every
        rank calls this; rank 0 reads the checkpoint)."""
        if self.engine is not None:
            if self.dist.is_main:
                from deepspeed.utils.zero_to_fp32 import (
                    get_fp32_state_dict_from_zero_checkpoint,
                )

                state = get_fp32_state_dict_from_zero_checkpoint(
                    str(self.checkpoint_dir / DEEPSPEED_DIR), tag=_ds_tag(self.cfg.steps))
                loaded = self.model.load_state_dict(state, strict=False)
                params = {name for name, _ in self.model.named_parameters()}
                if loaded.unexpected_keys or params & set(loaded.missing_keys):
                    raise TrainError("the consolidated ZeRO checkpoint does not match the "
                                     f"model: {loaded}")
            barrier(self.dist)
        if self.ema is not None:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name in self.ema.names:
                    params[name].copy_(self.ema.shadow[name])
        return self.model
