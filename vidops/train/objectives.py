"""Diffusion objectives: what the denoiser is trained to predict, and how sampling undoes it.

- `epsilon` and `v_prediction`: DDPM forward process (diffusers `DDPMScheduler`, linear or
  cosine / squaredcos betas); the model predicts the noise, or v = alpha * eps - sigma * x0.
- `flow_matching`: rectified flow, x_t = (1 - s) x0 + s * eps with s in [0, 1]; the model
  predicts the velocity eps - x0 (the objective of SD3 and of most recent video models).

Optional min-SNR-gamma loss weighting (Hang et al., 2023) for the DDPM objectives: it caps the
weight of low-noise timesteps, whose easy targets otherwise dominate the gradient.

The training noise, timesteps and caption dropout are drawn from a generator the caller seeds
per step, so a resumed run draws exactly what an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SchedulerMixin,
)

OBJECTIVES = ("epsilon", "v_prediction", "flow_matching")
SAMPLERS = ("ddim", "dpm", "euler")


@dataclass
class NoisedBatch:
    noisy: torch.Tensor
    timesteps: torch.Tensor  # float [B], what the denoiser is conditioned on
    target: torch.Tensor
    weights: torch.Tensor  # [B] per-sample loss weights


class Objective:
    """One of OBJECTIVES with its noise schedule: noising for training, the scheduler for
    sampling, and the scheduler config a model folder records."""

    def __init__(self, name: str, *, beta_schedule: str = "squaredcos_cap_v2",
                 num_train_timesteps: int = 1000, min_snr_gamma: float | None = None,
                 scheduler_config: dict[str, Any] | None = None) -> None:
        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
        if name == "flow_matching" and min_snr_gamma is not None:
            raise ValueError("min-SNR weighting applies to the DDPM objectives (epsilon, "
                             "v_prediction), not to flow matching: set train.min_snr_gamma: null")
        self.name = name
        self.beta_schedule = beta_schedule
        self.num_train_timesteps = num_train_timesteps
        self.min_snr_gamma = min_snr_gamma
        self._given_config = scheduler_config
        if scheduler_config is not None:
            # A base model's own noise process (a fine-tune must train under the schedule its
            # base learned, e.g. CogVideoX's scaled-linear betas rescaled to zero terminal SNR
            # and shifted by snr_shift_scale): its scheduler noises and gives the v target.
            if objective_of(scheduler_config) != name:
                raise ValueError(f"objective {name!r} does not match the scheduler config, "
                                 f"which predicts {objective_of(scheduler_config)!r}")
            if name != "flow_matching":
                cls = getattr(diffusers, str(scheduler_config.get("_class_name")), None)
                if cls is None or not hasattr(cls, "get_velocity"):
                    cls = DDPMScheduler
                self.ddpm = cls.from_config(scheduler_config)
                self.num_train_timesteps = int(self.ddpm.config.num_train_timesteps)
        elif name != "flow_matching":
            self.ddpm = DDPMScheduler(num_train_timesteps=num_train_timesteps,
                                      beta_schedule=beta_schedule, prediction_type=name,
                                      clip_sample=False)
        if name != "flow_matching":
            alphas = self.ddpm.alphas_cumprod.float()
            # Zero terminal SNR (CogVideoX) makes the last SNR 0: floored (at the smallest
            # float, which no other schedule reaches) so that min-SNR weights stay finite.
            self._snr = (alphas / (1 - alphas)).clamp_min(torch.finfo(torch.float32).tiny)

    @classmethod
    def from_config(cls, train: Any, scheduler_config: dict[str, Any] | None = None
                    ) -> Objective:
        """The objective `train` names; under `scheduler_config` (a base model's), with that
        scheduler's noise schedule."""
        return cls(train.objective, beta_schedule=train.beta_schedule,
                   num_train_timesteps=train.num_train_timesteps,
                   min_snr_gamma=train.min_snr_gamma, scheduler_config=scheduler_config)

    def noise(self, x0: torch.Tensor, generator: torch.Generator) -> NoisedBatch:
        batch = x0.shape[0]
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        if self.name == "flow_matching":
            # Logit-normal times (SD3): more weight on the middle of the path, where the
            # velocity is hardest to predict.
            s = torch.sigmoid(torch.randn(batch, generator=generator)).to(x0.device)
            view = s.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
            return NoisedBatch((1 - view) * x0 + view * eps, s * self.num_train_timesteps,
                               eps - x0, torch.ones(batch, device=x0.device))
        t = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator)
        t = t.to(x0.device)
        noisy = self.ddpm.add_noise(x0, eps, t)
        target = eps if self.name == "epsilon" else self.ddpm.get_velocity(x0, eps, t)
        weights = torch.ones(batch, device=x0.device)
        if self.min_snr_gamma is not None:
            snr = self._snr.to(x0.device)[t]
            capped = snr.clamp(max=self.min_snr_gamma)
            weights = capped / snr if self.name == "epsilon" else capped / (snr + 1)
        return NoisedBatch(noisy, t.float(), target, weights)

    def loss(self, prediction: torch.Tensor, batch: NoisedBatch) -> torch.Tensor:
        per_sample = (prediction.float() - batch.target.float()).pow(2).flatten(1).mean(1)
        return (per_sample * batch.weights).mean()

    def scheduler_config(self) -> dict[str, Any]:
        """What a model folder's scheduler/ records: the training schedule and objective."""
        if self._given_config is not None:
            return dict(self._given_config)
        scheduler = (FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps)
                     if self.name == "flow_matching" else self.ddpm)
        return {"_class_name": type(scheduler).__name__, **scheduler.config}

    def sampler(self, name: str) -> SchedulerMixin:
        """A sampling scheduler matched to the objective: DDIM or DPM-Solver++ for the DDPM
        objectives (DPM-Solver also for flow matching, on flow sigmas), Euler for flow."""
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
        return sampler_for(self.scheduler_config(), name)


def objective_of(scheduler_config: dict[str, Any]) -> str:
    if scheduler_config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        return "flow_matching"
    return str(scheduler_config.get("prediction_type", "epsilon"))


def sampler_for(scheduler_config: dict[str, Any], name: str) -> SchedulerMixin:
    """The sampling scheduler `name` for a model trained under `scheduler_config`."""
    objective = objective_of(scheduler_config)
    if objective == "flow_matching":
        if name == "euler":
            return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        if name == "dpm":
            return DPMSolverMultistepScheduler(
                num_train_timesteps=scheduler_config["num_train_timesteps"],
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
        raise ValueError("a flow-matching model samples with the euler or dpm sampler, not "
                         f"{name!r}")
    # Under the cosine schedule the last training timestep has alpha_bar ~ 0, where an
    # epsilon model's estimate of x0 divides by sqrt(alpha_bar) and explodes. v-prediction
    # stays finite there, so it may start from it (trailing spacing); epsilon starts one
    # stride lower (leading spacing, Stable Diffusion's offset), and DPM-Solver clips lambda
    # as diffusers advises for cosine schedules.
    if str(scheduler_config.get("_class_name", "")).startswith("CogVideoX"):
        # CogVideoX's schedulers carry its SNR shift, which the generic ones would drop.
        if name != "ddim":
            raise ValueError("a CogVideoX model samples with the ddim sampler (its own "
                             f"CogVideoXDDIMScheduler), not {name!r}")
        return CogVideoXDDIMScheduler.from_config(scheduler_config)
    spacing = "trailing" if objective == "v_prediction" else "leading"
    if name == "ddim":
        return DDIMScheduler.from_config(scheduler_config, timestep_spacing=spacing,
                                         steps_offset=0 if spacing == "trailing" else 1,
                                         clip_sample=False, set_alpha_to_one=False)
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(
            scheduler_config, timestep_spacing=spacing,
            steps_offset=0 if spacing == "trailing" else 1, lambda_min_clipped=-5.1)
    raise ValueError(f"a {objective} model samples with the ddim or dpm sampler, not {name!r}")
