"""The minimal reproducer of the CPU update step's cost: one 3x3 convolution (batch 48, 24 x 24,
64 -> 64 channels, NHWC, float32), its forward, input gradient and weight gradient, JAX against
torch on this CPU, and which XLA:CPU path compiled each (YNNPACK fusion, XNNPACK, oneDNN, or
XLA's own convolution).

    python -m benchmarks.conv_grad                # one line of JSON
    taskset -c 0 python -m benchmarks.conv_grad   # one core, as each trainer device runs

The CPU's vector extensions are in the output (`lscpu` flags): run it on an AVX2-only machine and
an AVX-512 one to compare. XLA_FLAGS=--xla_cpu_max_isa=AVX2 caps XLA's own code generation but
not the YNNPACK kernels, which pick their ISA at run time; torch honours ATEN_CPU_CAPABILITY=avx2
and ONEDNN_MAX_CPU_ISA=AVX2.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

B, H, C = 48, 24, 64


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def xla_path(hlo: str) -> str:
    if "__ynn_fusion" in hlo:
        return "YNNPACK"
    if "__xnn_fusion" in hlo:
        return "XNNPACK"
    if "onednn" in hlo.lower():
        return "oneDNN"
    return "XLA convolution (Eigen)"


def measure() -> dict:
    import jax
    import torch
    from prdp_jax.infra import runtime
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, H, H, C)).astype(np.float32)
    w = (rng.normal(size=(3, 3, C, C)) * 0.05).astype(np.float32)
    g = rng.normal(size=(B, H, H, C)).astype(np.float32)
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    jax_fns = {
        "forward": (lambda x, w, g: conv(x, w)),
        "input_grad": (lambda x, w, g: jax.vjp(lambda v: conv(v, w), x)[1](g)[0]),
        "weight_grad": (lambda x, w, g: jax.vjp(lambda v: conv(x, v), w)[1](g)[0]),
    }
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
    tg = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    F = torch.nn.functional
    torch_fns = {
        "forward": lambda: F.conv2d(tx, tw, padding=1),
        "input_grad": lambda: torch.nn.grad.conv2d_input(tx.shape, tw, tg, padding=1),
        "weight_grad": lambda: torch.nn.grad.conv2d_weight(tx, tw.shape, tg, padding=1),
    }
    host = runtime.host()
    out = {"cpu_avx512f": host["avx512"], "cpu_avx2": host["avx2"],
           "cores": len(os.sched_getaffinity(0)), "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "torch_capability": torch.backends.cpu.get_cpu_capability(),
           "gflop": 2 * B * H * H * C * C * 9 / 1e9}
    for name, fn in jax_fns.items():
        compiled = jax.jit(fn).lower(x, w, g).compile()
        jax_ms = median_ms(lambda: jax.block_until_ready(compiled(x, w, g)))
        with torch.no_grad():
            torch_ms = median_ms(torch_fns[name])
        out[name] = {"jax_ms": jax_ms, "torch_ms": torch_ms, "ratio": jax_ms / torch_ms,
                     "xla_path": xla_path(compiled.as_text())}
    return out


if __name__ == "__main__":
    print(json.dumps(measure()))
