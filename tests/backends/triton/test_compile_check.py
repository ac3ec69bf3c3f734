"""The ahead-of-time compile check (issue #15): the Triton kernels the ops launch compile for sm_80 and
sm_90 within the budget (no error, no spill, shared memory within limits, wgmma on sm_90, >= 90% of
the tensor-core conv compiles pipelined). No GPU needed: Triton compiles offline and bundles ptxas."""
import importlib.util

import pytest

from ...conftest import run_module

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_subset_meets_the_budget():
    done = run_module("gan_fast.backends.triton.compile_check", "--subset")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "budget met" in done.stdout
    # the trace really reached the three conv kernels on both targets
    for kernel in ("_conv2d_kernel", "_conv_transpose2d_kernel", "_conv_weight_grad_kernel"):
        for target in ("sm_80", "sm_90"):
            assert f"| {target} | {kernel} |" in done.stdout, (target, kernel)


def test_judge_flags_every_rule():
    from gan_fast.backends.triton import compile_check as cc

    def job(key, name="_conv2d_kernel"):
        return dict(key=key, name=name, module=cc.CONV_MODULE, dtype="bfloat16", options={"num_warps": 4},
                    meta={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32})

    good = dict(arch=90, registers=128, spill=0, shared=1024, mma="wgmma", async_copies=4)
    results = [dict(good, key="ok"), dict(good, key="spill", spill=8), dict(good, key="mma", mma="mma"),
               dict(good, key="smem", shared=cc.TARGETS[90] + 1), dict(arch=80, key="err", error="boom"),
               dict(good, key="nopipe", async_copies=0)]
    jobs = {r["key"]: job(r["key"]) for r in results}
    offenders, summary = cc.judge(jobs, results)
    text = "\n".join(offenders)
    assert "bytes of spills" in text and "instead of wgmma" in text and "shared memory" in text
    assert "compile error boom" in text and "pipelined tensor-core conv compiles 4/5" in text
    assert summary == dict(compiles=6, tensor_core=5, pipelined=4, spilling=1, errors=1)
    assert cc.judge({"ok": job("ok")}, [dict(good, key="ok")])[0] == []


def test_markdown_keeps_other_versions_and_text(tmp_path):
    from gan_fast.backends.triton import compile_check as cc

    doc = tmp_path / "gpu.md"
    doc.write_text("# GPU\n\nthe GPU command\n")
    cc.write_markdown(str(doc), "3.9.0", ["#### Triton 3.9.0", "", "old"])
    cc.write_markdown(str(doc), "3.6.0", ["#### Triton 3.6.0", "", "three-six"])
    cc.write_markdown(str(doc), "3.9.0", ["#### Triton 3.9.0", "", "new"])
    text = doc.read_text()
    assert text.startswith("# GPU\n\nthe GPU command\n")
    assert "three-six" in text and "new" in text and "old" not in text
    assert text.count("<!-- compile-budget:start -->") == 1 and text.count("#### Triton 3.9.0") == 1


def test_subset_covers_every_config_in_every_dtype():
    # the fp32 transposed-conv tiles spilled where the bf16 ones of the same config did not: a cover of
    # configs and dtypes apart (one fp32 compile, one bf16 compile) would have missed them
    from gan_fast.backends.triton import compile_check as cc

    def job(i, config, dtype):
        return dict(key=str(i), name="_conv_transpose2d_kernel", dtype=dtype, flags=(), unit=(),
                    meta={"BLOCK_M": config, "BLOCK_N": 64, "BLOCK_K": 16}, options={"num_warps": 4})

    traced = [job(i, config, dtype) for i, (config, dtype) in
              enumerate((c, d) for c in (64, 128) for d in ("float32", "bfloat16"))]
    chosen = cc.select([(j, 80) for j in traced])
    assert sorted((j["meta"]["BLOCK_M"], j["dtype"]) for j, _ in chosen) == \
        sorted((c, d) for c in (64, 128) for d in ("float32", "bfloat16"))


def test_unknown_kernel_is_refused_not_vacuously_within_budget():
    done = run_module("gan_fast.backends.triton.compile_check", "--workloads", "mlp", "--kernels",
                      "_conv_transpose2d_kernel,_no_such_kernel")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "_no_such_kernel: not launched by the workloads" in done.stderr
    assert "budget met" not in done.stdout
