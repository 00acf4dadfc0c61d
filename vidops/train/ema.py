"""Exponential moving average of the trainable weights: what sampling and the saved model use."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class EMA:
    """Shadow copies of the trainable parameters, updated after each optimizer step.

    The decay ramps up as min(decay, (1 + n) / (10 + n)): early in training the average
    follows the weights closely instead of remembering the random initialisation.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().clone().float() for n in self.names}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = dict(model.named_parameters())
        for name in self.names:
            self.shadow[name].lerp_(params[name].detach().float(), 1 - decay)

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The model with EMA weights inside the block, its own weights restored after."""
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.names}
        with torch.no_grad():
            for name in self.names:
                params[name].copy_(self.shadow[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name in self.names:
                    params[name].copy_(saved[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if sorted(state["shadow"]) != sorted(self.names):
            raise ValueError("EMA state does not match the model's trainable parameters")
        self.decay, self.updates = state["decay"], state["updates"]
        self.shadow = {n: t.clone().float() for n, t in state["shadow"].items()}
