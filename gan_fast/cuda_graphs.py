"""The whole training step captured in one CUDA graph (``--cuda-graphs``).

A DCGAN step at batch 128 is a few hundred small kernels; on an H100 launching them costs more than
running them. Capturing the step once and replaying it removes the launch overhead (the "whole
network capture" of the PyTorch CUDA-graphs notes, torch.cuda.graphs). The step function itself is
unchanged: ``GraphedStep`` wraps ``Trainer.train_step``; the real batch is copied into a static input
buffer before each replay and the statistics come out of a static output tensor.

What capture needs from the step, and how it is met:
- no host synchronisation and no CPU-side tensors: the fused ops keep their statistics on the device,
  the step returns its statistics as a device tensor, the noise comes from the CUDA generator (graph-
  safe: each replay advances its Philox offset);
- optimizers whose step is capturable: Adam(capturable=True) keeps its step count on the device;
- static shapes: the loop only ever yields full batches (the last partial batch is dropped);
- host-side decisions made the same way at every call: D's requires_grad, switched off for the G
  update and back on within the step, shapes the autograd graph while it is recorded, so the capture
  holds the G update without D's weight gradients and every replay runs exactly that;
- no GradScaler (fp16 loss scaling decides on the host whether to skip a step): --amp fp16 runs
  without graphs.

Warm-up (which also runs Triton's autotuning and cuDNN's algorithm search outside the capture) runs
real steps, so everything they change is put back in place afterwards (``warm_up``, ``Snapshot``):
the models, the BatchNorm statistics, the optimizers' whole state (Adam's moments and step counts:
those of the checkpoint on a resumed run, a fresh Adam's zeros on a new one) and the generator the
noise comes from. The graphed run starts from exactly the state an eager run would, and draws the same
noise. That logic runs on any device (tests/test_cuda_graphs.py checks it on the CPU); only the
capture itself needs CUDA.
"""
from __future__ import annotations

import torch

WARMUP_STEPS = 3


def unsupported_reason(trainer) -> str | None:
    """None when the trainer's step can be captured, else why not."""
    cfg = trainer.cfg
    if trainer.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if trainer.amp == "fp16":
        return "--amp fp16 needs GradScaler, which syncs with the host; use --amp bf16"
    if cfg.compile:
        return "--compile manages its own CUDA graphs (mode reduce-overhead)"
    if trainer.dist.enabled and cfg.cuda_graphs != "on":
        # DDP's bucketed all-reduce can be captured (NCCL is graph-safe) but is not yet verified
        # here on a multi-GPU machine: opt in with --cuda-graphs on
        return "not enabled automatically under torchrun (use --cuda-graphs on to capture DDP steps)"
    return None


class Snapshot:
    """Copies of everything a training step changes in place: parameters, buffers (BatchNorm running
    statistics), both optimizers' state (Adam's moments and step counts) and the state of the generator
    the step draws its noise from. ``restore()`` copies them back into the same tensor objects, which
    a captured graph keeps reading and writing."""

    def __init__(self, trainer):
        self.device = trainer.device
        modules = (trainer.netG, trainer.netD)
        self.tensors = [(t, t.detach().clone()) for m in modules for t in (*m.parameters(), *m.buffers())]
        # per optimizer: {param: {key: copy}}; a parameter without state has not been stepped yet
        self.optimizers = [(opt, {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                                  for p, s in opt.state.items()})
                           for opt in (trainer.optG, trainer.optD)]
        self.rng = _get_rng_state(self.device)

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, copy in self.tensors:
            tensor.copy_(copy)
        for opt, saved in self.optimizers:
            for param, state in opt.state.items():
                before = saved.get(param)
                for key, value in state.items():
                    if before is None:  # created by the warm-up: a fresh Adam's state is all zeros
                        if torch.is_tensor(value):
                            value.zero_()
                    elif torch.is_tensor(value):
                        value.copy_(before[key])
                    else:
                        state[key] = before[key]
        _set_rng_state(self.device, self.rng)


def _get_rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def warm_up(trainer, real_u8: torch.Tensor, steps: int = WARMUP_STEPS) -> None:
    """Run ``steps`` real training steps on ``real_u8`` (on a side stream on CUDA, as capture
    requires), then put back everything they changed: the trainer is left exactly as it was."""
    saved = Snapshot(trainer)
    if trainer.device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(steps):
                trainer.train_step(real_u8)
        torch.cuda.current_stream().wait_stream(side)
    else:
        for _ in range(steps):
            trainer.train_step(real_u8)
    saved.restore()


def set_adam_flags(optimizer: torch.optim.Optimizer, capturable: bool, fused: bool = False) -> None:
    """Set Adam's ``capturable`` and ``fused`` for this run, after load_state_dict (which restores the
    flags of the run that wrote the checkpoint): a checkpoint of a graphed CUDA run resumes on a CPU,
    an eager one under --cuda-graphs, a CPU run's (fused) on CUDA. A capturable Adam keeps its step
    counts on the parameters' device, an eager one on the CPU (no sync per step to read them)."""
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        group["fused"] = fused or None
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if torch.is_tensor(state.get("step")):
                device = param.device if capturable else torch.device("cpu")
                state["step"] = state["step"].to(device=device, dtype=torch.float32)


class GraphedStep:
    """``GraphedStep(trainer)(real_u8)`` does what ``trainer.train_step(real_u8)`` does, replayed from
    a CUDA graph captured at the first call."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.graph = None
        self.static_input = None
        self.static_stats = None

    def _capture(self, real_u8: torch.Tensor) -> None:
        trainer = self.trainer
        self.static_input = real_u8.clone()
        warm_up(trainer, self.static_input)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_stats = trainer.train_step(self.static_input)

    def __call__(self, real_u8: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            self._capture(real_u8)
        self.static_input.copy_(real_u8, non_blocking=True)
        self.graph.replay()
        return self.static_stats.clone()  # the next replay overwrites static_stats
