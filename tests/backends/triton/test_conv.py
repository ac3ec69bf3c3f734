"""The implicit-GEMM launchers' operand preparation (gan_fast/backends/triton/_conv.py)."""
import torch


def test_strides_are_canonical_channels_last_on_size_one_dims():
    # A size-1 dim may carry any stride; a contiguous [N, C, 1, 1] tensor has stride 1 on H and W,
    # which hid from Triton that its pixel rows start C apart and left the 16-bit loads of the MLP's
    # GEMM-shaped transposed convs out of cp.async (compile_check: 10 unpipelined compiles)
    from gan_fast.backends.triton._conv import strides

    x = torch.randn(5, 32, 1, 1)
    assert x.stride() == (32, 1, 1, 1)
    assert strides(x) == (32, 1, 32, 32)
    cl = torch.randn(2, 48, 3, 7).contiguous(memory_format=torch.channels_last)
    assert strides(cl) == cl.stride()
    one = torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    assert strides(one)[1:] == (1, 64, 16)
    nchw = torch.randn(2, 48, 3, 7)  # not channels_last: its own strides
    assert strides(nchw) == nchw.stride()
    assert strides(nchw[:, ::2]) == nchw[:, ::2].stride()


def test_transposed_conv_reads_padded_output_channels_but_stores_only_real_ones():
    # the weight's output channels are zero-padded to 16 for the loads; the 13 pad columns of the tile
    # must not be stored (the output has 3 channels) nor counted in the statistics
    from gan_fast.backends.triton._conv import conv_transpose2d_forward

    x = torch.randn(2, 5, 3, 3)
    w = torch.randn(5, 3, 4, 4)
    y, partials = conv_transpose2d_forward(x, w, None, (2, 2), (1, 1), stats=True)
    ref = torch.nn.functional.conv_transpose2d(x, w, stride=2, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    cnt, pmean, _ = partials
    assert cnt.shape[1] == 3 and torch.equal(cnt.sum(0), torch.full((3,), 2.0 * 6 * 6))
    mean = (cnt * pmean).sum(0) / cnt.sum(0)
    torch.testing.assert_close(mean, ref.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
