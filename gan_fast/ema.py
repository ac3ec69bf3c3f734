"""An exponential moving average of the generator's weights (``train --ema DECAY``).

Averaging G's parameters over the last ~1/(1 - DECAY) steps smooths out the oscillation of GAN
training, so samples from the average are usually better than from the last iterate (Yazici et al.
2019, "The Unusual Effectiveness of Averaging in GAN Training"; Karras et al. 2018, Progressive GAN).
BatchNorm's running statistics are not averaged but copied from G: they already are moving averages,
of G's activations.

The average lives in a deep copy of G taken before ``fuse``, so it is made of the reference modules
(it only runs for samples and evaluation, where fused kernels buy nothing) and its state_dict has G's
keys: checkpoints store it as ``netG_ema``, which loads into any Generator of the same config.
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
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # Tensors are paired by name once, here: fuse() and compile() keep G's Parameter and buffer
        # objects, so the pairs stay valid for the whole run and the update is two foreach calls.
        params, ema_params = dict(model.named_parameters()), dict(self.model.named_parameters())
        buffers, ema_buffers = dict(model.named_buffers()), dict(self.model.named_buffers())
        self._src_params = [params[k] for k in ema_params]
        self._ema_params = list(ema_params.values())
        self._src_buffers = [buffers[k] for k in ema_buffers]
        self._ema_buffers = list(ema_buffers.values())

    def decay_at(self, step: int) -> float:
        """The decay, lowered for the first steps: min(decay, (1 + step) / (10 + step)), the warm-up of
        TensorFlow's ExponentialMovingAverage(num_updates). Without it the average of a short run would
        still be mostly the random initialisation (0.999^1500 = 22%)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in G's current weights (after training step ``step``, counted from 1)."""
        # ema += (1 - decay) * (param - ema), one fused kernel over the whole parameter list
        torch._foreach_lerp_(self._ema_params, self._src_params, 1.0 - self.decay_at(step))
        if self._ema_buffers:
            torch._foreach_copy_(self._ema_buffers, self._src_buffers)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
