import pytest
import torch

from gan_fast.backends.triton import bce_with_logits
from gan_fast.backends.reference import bce_with_logits as bce_with_logits_reference

from ...conftest import DEVICE
from ..utils import assert_close, check_against_fp64, gpu_accuracy_test, make_input


@pytest.mark.parametrize("shape, target_kind", [((7,), "hard"), ((3, 5), "soft"), ((1,), "soft"),
                                                ((4, 3), "broadcast")])
def test_matches_reference(shape, target_kind):
    logits = make_input(shape, scale=3.0)
    if target_kind == "hard":
        target = torch.randint(0, 2, shape, device=DEVICE).float()
    elif target_kind == "soft":
        target = torch.rand(shape, device=DEVICE).requires_grad_()
    else:
        target = torch.full((1,) * len(shape), 0.9, device=DEVICE).requires_grad_()
    loss = bce_with_logits(logits, target)
    loss_ref = bce_with_logits_reference(logits, target.expand(shape))
    assert_close(loss, loss_ref, name="loss")
    live = [t for t in (logits, target) if t.requires_grad]
    for got, want in zip(torch.autograd.grad(loss * 1.7, live), torch.autograd.grad(loss_ref * 1.7, live)):
        assert_close(got, want, name="grad")


def test_large_logits_are_finite_and_exact():
    logits = torch.tensor([-200.0, -30.0, -5.0, 0.0, 5.0, 30.0, 200.0], device=DEVICE, requires_grad=True)
    for value in (0.0, 1.0):
        target = torch.full_like(logits, value)
        loss = bce_with_logits(logits, target)
        loss_ref = bce_with_logits_reference(logits.double(), target.double())
        torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-6, atol=0)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(grad).all()
    # a confident, correct logit: loss ~ exp(-30) must not round to 0
    tiny = bce_with_logits(torch.tensor([30.0], device=DEVICE), torch.tensor([1.0], device=DEVICE))
    torch.testing.assert_close(tiny.double(), torch.tensor(9.357623e-14, dtype=torch.float64, device=DEVICE),
                               rtol=1e-5, atol=0)


def test_bad_inputs():
    logits = make_input((4,))
    with pytest.raises(ValueError, match="broadcast"):
        bce_with_logits(logits, torch.rand(3, device=DEVICE))
    with pytest.raises(TypeError, match="float32"):
        bce_with_logits(logits, torch.ones(4, dtype=torch.long, device=DEVICE))


@gpu_accuracy_test
def test_gpu_accuracy(dtype):
    inputs = [torch.randn(4096, device=DEVICE) * 4, torch.rand(4096, device=DEVICE)]
    check_against_fp64(bce_with_logits, bce_with_logits_reference, inputs, dtype, grad_count=1,
                       cast_count=2)
