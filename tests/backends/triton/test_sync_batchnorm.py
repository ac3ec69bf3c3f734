"""SyncBatchNorm in the Triton ops: 2 gloo ranks with half the batch each equal one process with the
whole batch (output, input gradient, parameter gradients summed over ranks, running statistics)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gan_fast.backends.triton import conv2d_bn_leaky_relu, linear_bn_leaky_relu
from gan_fast.backends.reference import conv2d_bn_leaky_relu as conv2d_bn_leaky_relu_reference
from gan_fast.backends.reference import linear_bn_leaky_relu as linear_bn_leaky_relu_reference

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case(name):
    """(fused op, reference, input shape, params) with fresh seeded random values."""
    g = torch.Generator().manual_seed(0)
    bn = [torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)]
    if name == "conv":
        kw = dict(stride=1, padding=1, momentum=0.1, eps=1e-5, negative_slope=0.2)
        return (lambda x, w, *r, **k: conv2d_bn_leaky_relu(x, w, *r, **kw, **k),
                lambda x, w, *r, **k: conv2d_bn_leaky_relu_reference(x, w, *r, **kw, **k),
                torch.randn(6, 3, 5, 5, generator=g), [torch.randn(5, 3, 3, 3, generator=g) * 0.3] + bn)
    kw = dict(momentum=0.1, eps=1e-5, negative_slope=0.2)
    return (lambda x, w, b, *r, **k: linear_bn_leaky_relu(x, w, b, *r, **kw, **k),
            lambda x, w, b, *r, **k: linear_bn_leaky_relu_reference(x, w, b, *r, **kw, **k),
            torch.randn(6, 7, generator=g), [torch.randn(5, 7, generator=g) * 0.3, torch.randn(5, generator=g)] + bn)


def _worker(rank, name, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        fused, _, x, params = _case(name)
        part = slice(rank * x.shape[0] // WORLD, (rank + 1) * x.shape[0] // WORLD)
        x = x[part]
        xr = x.clone().requires_grad_()
        pr = [p.clone().requires_grad_() for p in params]
        rm, rv = torch.zeros(5), torch.ones(5)
        y = fused(xr, *pr, rm, rv, training=True, process_group=dist.group.WORLD)
        dy_full = torch.randn((x.shape[0] * WORLD, *y.shape[1:]), generator=torch.Generator().manual_seed(1))
        (y * dy_full[part]).sum().backward()
        grads = [p.grad for p in pr]
        for t in grads:
            dist.all_reduce(t)  # what DDP does (up to its 1/world averaging)
        results[rank] = (y.detach(), xr.grad, grads, rm, rv)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="runs the Triton kernels on CPU tensors (gloo) through the interpreter")
@pytest.mark.parametrize("name", ["conv", "linear"])
def test_two_ranks_equal_one_process_with_the_whole_batch(name):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(name, _free_port(), results), nprocs=WORLD)
    _, reference, x, params = _case(name)
    xs = x.clone().requires_grad_()
    ps = [p.clone().requires_grad_() for p in params]
    rm, rv = torch.zeros(5), torch.ones(5)
    ys = reference(xs, *ps, rm, rv, training=True)
    dy = torch.randn(ys.shape, generator=torch.Generator().manual_seed(1))
    (ys * dy).sum().backward()
    half = x.shape[0] // WORLD
    for rank in range(WORLD):
        y, dx, grads, rm_r, rv_r = results[rank]
        part = slice(rank * half, (rank + 1) * half)
        torch.testing.assert_close(y, ys.detach()[part], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dx, xs.grad[part], rtol=1e-4, atol=1e-5)
        for got, p in zip(grads, ps):
            scale = max(p.grad.abs().max().item(), 1.0)
            torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-4 * scale)
        torch.testing.assert_close(rm_r, rm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rv_r, rv, rtol=1e-5, atol=1e-6)
