"""bn_act forward + backward (training) on each ISA build of the CPU BatchNorm kernels
(csrc/cpu/bn_cpu.cpp), at the BatchNorm shapes of DCGAN-64 with batch 16, fp32 and bf16.

    python tools/bench_cpu_isa.py [--rounds 5] [--iters 20] [--threads 1]

A process runs one build (picked once per process, forced by the environment of
gan_fast.backends.ext.CPU_ISA_ENV as tests/backends/test_ext_isa.py does), so each round starts one
subprocess per build, in an order rotated every round, and the table gives each build's median over
the rounds: on a shared machine the alternation spreads the other load over every build alike. Times
are milliseconds per forward + backward of one layer.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gan_fast.backends.ext import CPU_ISA_ENV as BUILDS  # noqa: E402

# (name, shape, act): the generator's BatchNorm + ReLU layers (ngf 64) and the discriminator's
# BatchNorm + LeakyReLU ones (ndf 64), batch 16.
LAYERS = [("G 512x4x4", (16, 512, 4, 4), "relu"), ("G 256x8x8", (16, 256, 8, 8), "relu"),
          ("G 128x16x16", (16, 128, 16, 16), "relu"), ("G 64x32x32", (16, 64, 32, 32), "relu"),
          ("D 128x16x16", (16, 128, 16, 16), "leaky"), ("D 256x8x8", (16, 256, 8, 8), "leaky"),
          ("D 512x4x4", (16, 512, 4, 4), "leaky")]

CHILD = """
import json, sys, time, torch
import gan_fast.backends.ext as ext
torch.set_num_threads(int(sys.argv[1]))
iters = int(sys.argv[2])
layers = json.loads(sys.argv[3])
res = {"isa": {d: ext.cpu_kernel_isa(getattr(torch, d)) for d in ("float32", "bfloat16")}, "ms": {}}
for dname in ("float32", "bfloat16"):
    dtype = getattr(torch, dname)
    for name, shape, act in layers:
        c = shape[1]
        x = torch.randn(shape).to(dtype).requires_grad_()
        g, b = (torch.rand(c) + 0.5).requires_grad_(), torch.randn(c).requires_grad_()
        rm, rv = torch.zeros(c), torch.ones(c)
        dy = torch.randn(shape).to(dtype)
        code, slope = (ext.ACT_RELU, 0.0) if act == "relu" else (ext.ACT_LEAKY_RELU, 0.2)
        def step():
            y = ext._bn_act(x, g, b, rm, rv, True, 0.1, 1e-5, code, slope)
            torch.autograd.grad(y, [x, g, b], dy)
        for _ in range(3):
            step()
        t = time.perf_counter()
        for _ in range(iters):
            step()
        res["ms"][dname + " " + name] = (time.perf_counter() - t) / iters * 1e3
print(json.dumps(res))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    times: dict[str, dict[str, list[float]]] = {}
    ran: dict[str, dict] = {}
    names = list(BUILDS)
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **BUILDS[name]}
            out = subprocess.run([sys.executable, "-c", CHILD, str(a.threads), str(a.iters), json.dumps(LAYERS)],
                                 env=env, capture_output=True, text=True, check=True)
            res = json.loads(out.stdout)
            ran[name] = res["isa"]
            for k, v in res["ms"].items():
                times.setdefault(k, {}).setdefault(name, []).append(v)
    # a build this CPU cannot run fell back to another: report what each environment ran
    print("ran:", json.dumps(ran))
    print(f"{'layer (ms per fwd+bwd, median of ' + str(a.rounds) + ')':44s}" + "".join(f"{n:>12s}" for n in names)
          + "   default/avx2/avx512/avx512_bf16 speed-up vs default")
    for k, per in times.items():
        med = {n: statistics.median(per[n]) for n in names}
        print(f"{k:44s}" + "".join(f"{med[n]:12.3f}" for n in names) + "   "
              + " / ".join(f"{med['default'] / med[n]:.2f}x" for n in names))


if __name__ == "__main__":
    main()
