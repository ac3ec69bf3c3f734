import pytest
import torch

from gan_fast.backends.triton import d_head_bce_with_logits
from gan_fast.backends.reference import d_head_bce_with_logits as d_head_bce_with_logits_reference

from ...conftest import DEVICE
from ..utils import assert_close, check_against_fp64, gpu_accuracy_test, make_input


@pytest.mark.parametrize("n, c, size, target_kind, layout", [
    (4, 37, 4, "hard", "contiguous"),      # DCGAN's head: 4x4 map -> 1 logit
    (1, 3, 1, "soft", "channels_last"),
    (3, 63, 2, "scalar", "strided"),       # one label for the whole batch (real = 1)
])
def test_matches_reference(n, c, size, target_kind, layout):
    x = make_input((n, c, size, size), layout)
    w = make_input((1, c, size, size), scale=0.3)
    if target_kind == "hard":
        target = torch.randint(0, 2, (n,), device=DEVICE).float()
    elif target_kind == "soft":
        target = torch.rand(n, device=DEVICE).requires_grad_()
    else:
        target = torch.tensor(1.0, device=DEVICE)
    loss, logits = d_head_bce_with_logits(x, w, target)
    loss_ref, logits_ref = d_head_bce_with_logits_reference(x, w, target)
    assert_close(loss, loss_ref, name="loss")
    assert_close(logits, logits_ref, name="logits")
    assert not logits.requires_grad
    live = [t for t in (x, w, target) if t.requires_grad]
    for got, want in zip(torch.autograd.grad(loss * 0.7, live), torch.autograd.grad(loss_ref * 0.7, live)):
        assert_close(got, want, name="grad")


def test_bad_inputs():
    x = make_input((2, 3, 4, 4))
    with pytest.raises(ValueError, match="one logit per sample"):
        d_head_bce_with_logits(x, make_input((1, 3, 2, 2)), torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="channels"):
        d_head_bce_with_logits(x, make_input((1, 4, 4, 4)), torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="broadcast"):
        d_head_bce_with_logits(x, make_input((1, 3, 4, 4)), torch.ones(3, device=DEVICE))


@gpu_accuracy_test
def test_gpu_accuracy(dtype):
    inputs = [torch.randn(128, 512, 4, 4, device=DEVICE), torch.randn(1, 512, 4, 4, device=DEVICE) * 0.02,
              torch.rand(128, device=DEVICE)]
    check_against_fp64(d_head_bce_with_logits, d_head_bce_with_logits_reference, inputs, dtype,
                       grad_count=2, cast_count=2)
