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
- no GradScaler (fp16 loss scaling decides on the host whether to skip a step): --amp fp16 runs
  without graphs.

Warm-up (which also runs Triton's autotuning and cuDNN's algorithm search outside the capture) runs
real steps, so the models, the BatchNorm statistics and the optimizer moments are restored in place
afterwards, and so is the CUDA generator: the graphed run starts from exactly the state an eager
run would, and draws the same noise.
"""
from __future__ import annotations

import torch

WARMUP_STEPS = 3


def unsupported_reason(trainer) -> str | None:
    """None when the trainer's step can be captured, else why not."""
    cfg = trainer.cfg
    if trainer.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if cfg.amp == "fp16":
        return "--amp fp16 needs GradScaler, which syncs with the host; use --amp bf16"
    if cfg.compile:
        return "--compile manages its own CUDA graphs (mode reduce-overhead)"
    if trainer.dist.enabled and cfg.cuda_graphs != "on":
        # DDP's bucketed all-reduce can be captured (NCCL is graph-safe) but is not yet verified
        # here on a multi-GPU machine: opt in with --cuda-graphs on
        return "not enabled automatically under torchrun (use --cuda-graphs on to capture DDP steps)"
    return None


def _snapshot(trainer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, saved copy) for every tensor a training step changes in place."""
    tensors = [*trainer.netG.parameters(), *trainer.netD.parameters(),
               *trainer.netG.buffers(), *trainer.netD.buffers()]
    return [(t, t.detach().clone()) for t in tensors]


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
        saved = _snapshot(trainer)
        rng = torch.cuda.get_rng_state(trainer.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                trainer.train_step(self.static_input)
        torch.cuda.current_stream().wait_stream(side)
        # the first replay draws the noise the first eager step would have drawn
        torch.cuda.set_rng_state(rng, trainer.device)
        with torch.no_grad():
            for tensor, copy in saved:
                tensor.copy_(copy)
            for opt in (trainer.optG, trainer.optD):
                for state in opt.state.values():  # fresh Adam moments and step counts, in place
                    for value in state.values():
                        if torch.is_tensor(value):
                            value.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_stats = trainer.train_step(self.static_input)

    def __call__(self, real_u8: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            self._capture(real_u8)
        self.static_input.copy_(real_u8, non_blocking=True)
        self.graph.replay()
        return self.static_stats.clone()  # the next replay overwrites static_stats
