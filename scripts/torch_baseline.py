#!/usr/bin/env python3
"""PyTorch peer for `camex bench`: the official CAMEx formulation (materialised [R, N, O, I], four mode
products, [G, N, O, I] gating, sum), timed in eager mode and with torch.compile, forward and
forward+backward, with peak memory, at the shapes of SPEC section 8.

Prints one line per case in the format of `camex bench`:
  op=... shape=... device=cuda dtype=... pass=fwd|fwd+bwd median_ms=... gflops=... floor_ms=...
  peak_mem_mb=... impl=torch-eager|torch-compile gbps=... x_floor=...

Timing: CUDA events around each iteration, after warm-up (compilation and autotuning happen in the
warm-up, outside the timed region). Peak memory: torch.cuda.max_memory_allocated above what the
inputs hold. The floor uses this GPU's measured matmul rate in the same dtype (a large square
matmul) and its measured copy bandwidth, with the FLOP and byte counts of SPEC section 8 (backward
= 2x forward), the same model as benches/common/mod.rs.

Usage: python3 scripts/torch_baseline.py [--shape t5-base] [--dtype bf16] [--op ca_merge]
       [--pass all] [--iters 10] [--no-compile]
Not run on a GPU yet: its numbers are unmeasured until scripts/gpu-check.sh runs it on one.
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baseline_common import SHAPES, cost, default_pair  # noqa: E402


def main():
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="t5-base", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bf16", choices=["f32", "bf16", "f16"])
    ap.add_argument("--op", default="ca_merge", choices=["ca_merge", "curvature", "merge", "merged_linear", "all"])
    ap.add_argument("--pass", dest="pas", default="all", choices=["fwd", "fwd+bwd", "all"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("# torch_baseline: no CUDA device; nothing measured", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    dt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    elem = torch.tensor([], dtype=dt).element_size()

    # This GPU's rates: a large square matmul and a large copy, median of 5 after warm-up.
    def timed(fn, iters):
        ts = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e) / 1e3)
        return statistics.median(ts)

    m = 8192
    x = torch.randn(m, m, device=dev, dtype=dt)
    y = torch.randn(m, m, device=dev, dtype=dt)
    timed(lambda: x @ y, 3)
    gemm_flops = 2.0 * m**3 / timed(lambda: x @ y, 5)
    src = torch.empty(1 << 30, device=dev, dtype=torch.uint8)
    dst = torch.empty_like(src)
    timed(lambda: dst.copy_(src), 3)
    copy_bw = 2.0 * src.numel() / timed(lambda: dst.copy_(src), 5)
    del x, y, src, dst
    torch.cuda.empty_cache()
    print(f"machine device=cuda name={torch.cuda.get_device_name()} gemm_{a.dtype}_gflops={gemm_flops / 1e9:.1f} copy_gbps={copy_bw / 1e9:.1f}")

    o, i, n, r, g, t = SHAPES[a.shape]
    o1, o2 = default_pair(o)
    i1, i2 = default_pair(i)

    def curvature(base, experts, fa, fb, fc, fd):
        # The official formulation: tau broadcast to [R, N, O, I] and four mode products on the 6-D view.
        tau = experts - base
        x = tau.unsqueeze(0).expand(r, n, o, i).reshape(r, n, o1, o2, i1, i2)
        x = torch.einsum("rnak,rnkbcd->rnabcd", fa, x)
        x = torch.einsum("rnbk,rnakcd->rnabcd", fb, x)
        x = torch.einsum("rnck,rnabkd->rnabcd", fc, x)
        x = torch.einsum("rndk,rnabck->rnabcd", fd, x)
        return x.sum(0).reshape(n, o, i)

    def merge(base, p, scores):
        return base + (scores[:, :, None, None] * p[None]).sum(1)  # [G, N, O, I] gating, alpha = 1

    def ca_merge(base, experts, scores, fa, fb, fc, fd):
        return merge(base, curvature(base, experts, fa, fb, fc, fd), scores)

    def merged_linear(x, merged):
        return torch.bmm(x, merged.transpose(1, 2))

    gen = torch.Generator(device=dev).manual_seed(0xCA3E)

    def rnd(*shape, scale=1.0):
        return (torch.rand(*shape, device=dev, generator=gen, dtype=torch.float32) * 2 - 1).mul_(scale).to(dt)

    def eye(k):
        return (torch.eye(k, device=dev).expand(r, n, k, k) + 0.01 * torch.rand(r, n, k, k, device=dev, generator=gen)).to(dt)

    def inputs(op):
        base = rnd(o, i, scale=0.05)
        if op in ("ca_merge", "curvature"):
            experts = (base.float() + 0.01 * torch.rand(n, o, i, device=dev, generator=gen)).to(dt)
            scores = torch.softmax(torch.rand(g, n, device=dev, generator=gen), -1).to(dt)
            f = [eye(o1), eye(o2), eye(i1), eye(i2)]
            if op == "ca_merge":
                return ca_merge, [base, experts, scores, *f], (g, o, i)
            return (lambda b, e, s, *ff: curvature(b, e, *ff)), [base, experts, scores, *f], (n, o, i)
        if op == "merge":
            scores = torch.softmax(torch.rand(g, n, device=dev, generator=gen), -1).to(dt)
            return merge, [base, rnd(n, o, i, scale=0.01), scores], (g, o, i)
        return merged_linear, [rnd(g, t, i), rnd(g, o, i, scale=0.05)], (g, t, o)

    ops = ["ca_merge", "curvature", "merge", "merged_linear"] if a.op == "all" else [a.op]
    passes = ["fwd", "fwd+bwd"] if a.pas == "all" else [a.pas]
    modes = ["eager"] if a.no_compile else ["eager", "compile"]
    for op in ops:
        for pas in passes:
            for mode in modes:
                torch.cuda.empty_cache()
                fn, xs, out_shape = inputs(op)
                grad = rnd(*out_shape)
                if pas == "fwd+bwd":
                    xs = [v.detach().requires_grad_(True) for v in xs]
                f = torch.compile(fn) if mode == "compile" else fn

                def step():
                    if pas == "fwd":
                        with torch.no_grad():
                            return f(*xs)
                    for v in xs:
                        v.grad = None
                    out = f(*xs)
                    out.backward(grad)
                    return None

                for _ in range(a.warmup):
                    step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                held = torch.cuda.memory_allocated()
                med = timed(step, a.iters)
                peak = torch.cuda.max_memory_allocated() - held
                flop, nbytes = cost(op, a.shape, pas, elem)
                floor = max(flop / gemm_flops, nbytes / copy_bw)
                print(
                    f"op={op} shape={a.shape} device=cuda dtype={a.dtype} pass={pas} median_ms={med * 1e3:.3f} "
                    f"gflops={flop / med / 1e9:.2f} floor_ms={floor * 1e3:.3f} peak_mem_mb={peak / 2**20:.1f} "
                    f"impl=torch-{mode} gbps={nbytes / med / 1e9:.2f} x_floor={med / floor:.2f}",
                    flush=True,
                )
                del xs, grad, f
    return 0


if __name__ == "__main__":
    sys.exit(main())
