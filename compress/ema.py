"""An exponential moving average of a model's weights, evaluated and kept instead of the weights.

Polyak & Juditsky (1992), "Acceleration of Stochastic Approximation by Averaging", in the
form TensorFlow's ExponentialMovingAverage and timm's ModelEma use: after every optimizer step

    ema = d * ema + (1 - d) * weights,   d = min(decay, (1 + n) / (10 + n)) at update n,

so early on, while the weights move fast, the average forgets quickly. BatchNorm's running
statistics (and every other buffer, and integer parameters) are copied, not averaged: they
describe the activations of the current weights. The average is a second copy of the model, ready to evaluate.

Not torch.optim.swa_utils.AveragedModel: its update asks the device `n_averaged == 0` every
step, a host sync that `fit` avoids; here the count lives on the host.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        params = list(self.module.parameters())
        # Averaged: the floating-point parameters. Copied: buffers, and integer parameters (NNCF's
        # quantizers keep settings such as bit widths as parameters).
        self._averaged = [i for i, p in enumerate(params) if p.is_floating_point()]
        self._copied = [i for i, p in enumerate(params) if not p.is_floating_point()]
        self._params = [params[i] for i in self._averaged]
        self._others = [params[i] for i in self._copied] + list(self.module.buffers())

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model` (the same architecture it was made from)."""
        params = [p.detach() for p in model.parameters()]
        if len(params) != len(self._averaged) + len(self._copied):
            raise ValueError(f"EMA of a model with {len(self._averaged) + len(self._copied)} parameters updated "
                             f"from one with {len(params)}")
        torch._foreach_lerp_(self._params, [params[i] for i in self._averaged], 1.0 - self.current_decay())
        others = [params[i] for i in self._copied] + [b.detach() for b in model.buffers()]
        if others:
            torch._foreach_copy_(self._others, others)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
