"""The trainer's optimizer: torch's Adam, with its fused kernel handed channels_last tensors as the flat
runs of memory they are.

torch 2.13's fused CPU Adam (``fused=True``, the Trainer's choice on a CPU: one kernel per model where
the default runs 7 ops per tensor) computes the right update for a channels_last parameter, but copies
it there: a ``contiguous()`` clone per channels_last tensor and step (every conv weight of a model that
computes in channels_last: the ext backend on a CPU, or ``--channels-last``). For DCGAN-64's 8-MB
weight that clone took 3.5 ms; G's and D's Adam steps together took 8.1-9.0 ms, 5.1-5.2 ms without
the copies (2 threads, issue #16).

``Adam`` here gives the kernel each channels_last parameter, gradient and moment as a 1-D view of its
memory for the length of ``step``: Adam is elementwise, the four tensors are then aligned element for
element, and nothing is copied. Outside ``step`` every tensor has its usual shape and strides, so
state_dict, checkpoints and load_state_dict are torch's.
"""
from __future__ import annotations

import torch

__all__ = ["Adam"]

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _channels_last_only(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A channels_last tensor's memory as a 1-D view (NHWC order)."""
    return t.permute(0, 2, 3, 1).view(-1)


def _unflat(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    n, c, h, w = like.shape
    return flat.view(n, h, w, c).permute(0, 3, 1, 2)


class Adam(torch.optim.Adam):
    """torch.optim.Adam, whose fused kernel sees channels_last tensors as flat views (module docstring);
    every other case (not fused, contiguous parameters) is torch's step unchanged. A moment in another
    layout than its parameter's (loaded from a checkpoint of an NCHW run) is put in the parameter's
    layout once."""

    def step(self, closure=None):
        swapped = []
        try:
            for group in self.param_groups:
                if not group.get("fused"):
                    continue
                for p in group["params"]:
                    if p.grad is None or not _channels_last_only(p):
                        continue
                    like = p.data
                    state = self.state.get(p, {})
                    for key in _MOMENTS:
                        if torch.is_tensor(state.get(key)) and state[key].shape == like.shape:
                            state[key] = _flat(state[key].contiguous(memory_format=torch.channels_last))
                    grad = p.grad.contiguous(memory_format=torch.channels_last)
                    p.data = _flat(like)
                    p.grad = _flat(grad)
                    swapped.append((p, like, grad))
            return super().step(closure)  # torch's step sets its own grad mode (and the closure's)
        finally:
            for p, like, grad in swapped:
                p.data = like
                p.grad = grad
                state = self.state.get(p, {})
                for key in _MOMENTS:
                    if torch.is_tensor(state.get(key)) and state[key].dim() == 1 and state[key].numel() == like.numel():
                        state[key] = _unflat(state[key], like)
