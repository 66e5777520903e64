#!/usr/bin/env python3
"""XLA peer for `camex bench` on the CPU: the official CAMEx formulation (materialised [R, N, O, I],
four mode products, [G, N, O, I] gating, sum) under jax.jit, forward and forward+backward
(jax.grad of sum(out * grad_out) with respect to every input, as the candle peer's autograd), at the
shapes of SPEC section 8.

Two forms of the merge's gating: `impl=xla-official` is the official code's [G, N, O, I] broadcast
product summed over N; `impl=xla-einsum` writes the same sum as one einsum ('gn,noi->goi'), which is
what a JAX user would write and what XLA's CPU backend runs as a GEMM (8.2 s against 44 ms for the
gating alone at T5-small here, jax 0.10.2: XLA's reduction over a non-minor axis of the broadcast
is the slow path). Both run for merge and ca_merge (--gating), curvature has no gating.

Prints one line per case in the format of `camex bench`:
  op=... shape=... device=cpu dtype=f32 pass=fwd|fwd+bwd median_ms=... gflops=... floor_ms=...
  peak_mem_mb=... impl=xla-official gbps=... x_floor=...

JAX comes from PyPI into .venv-jax/ (git-ignored) at the repository root, which the script makes on
its first run (`python3 -m venv` and `pip install jax`) and then re-runs itself in.

Timing: jit compilation and one warm-up call happen first, outside the timed region; then --iters
calls, each ended by block_until_ready; the median is reported. Peak memory:
XLA's buffer assignment for the compiled call (temporaries plus outputs; the inputs are not
counted, as in `camex bench`). The floor: the FLOP and byte counts of SPEC section 8 (backward = 2x
forward FLOP, the same model as benches/common/mod.rs `cost`) over the machine's GEMM rate and copy
bandwidth; `camex bench --xla` passes the rates it measured (--gemm-gflops, --copy-gbps) so that
every line of a run shares one floor, otherwise XLA's own 2048^3 f32 matmul and a 256 MiB copy are
measured here.

Usage: python3 scripts/jax_baseline.py [--shape t5-small] [--op ca_merge|curvature|merge|all]
       [--pass fwd|fwd+bwd|all] [--iters 5] [--gemm-gflops G --copy-gbps B]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-jax")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baseline_common import SHAPES, cost, default_pair  # noqa: E402


def ensure_venv():
    """Re-runs this script inside .venv-jax, making it (and installing jax) first if needed."""
    py = os.path.join(VENV, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    if not os.path.exists(py) or subprocess.call([py, "-c", "import jax"], stderr=subprocess.DEVNULL) != 0:
        print("# jax_baseline: installing jax into .venv-jax (first run)", file=sys.stderr, flush=True)
        if not os.path.exists(py):
            subprocess.check_call([sys.executable, "-m", "venv", VENV])
        subprocess.check_call([py, "-m", "pip", "install", "-q", "jax"], stdout=sys.stderr)
    os.execv(py, [py, os.path.abspath(__file__)] + sys.argv[1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="t5-small", choices=sorted(SHAPES))
    ap.add_argument("--op", default="ca_merge", choices=["ca_merge", "curvature", "merge", "all"])
    ap.add_argument("--pass", dest="pas", default="all", choices=["fwd", "fwd+bwd", "all"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--gating", default="both", choices=["official", "einsum", "both"])
    ap.add_argument("--gemm-gflops", type=float, default=None)
    ap.add_argument("--copy-gbps", type=float, default=None)
    a = ap.parse_args()
    ensure_venv()

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_platforms", "cpu")

    def timed(fn, iters):
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            ts.append(time.perf_counter() - t0)
        return ts

    if a.gemm_gflops and a.copy_gbps:
        gemm_flops, copy_bw = a.gemm_gflops * 1e9, a.copy_gbps * 1e9
    else:
        m = 2048
        x = jnp.ones((m, m), jnp.float32)
        mm = jax.jit(lambda p, q: p @ q)
        timed(lambda: mm(x, x), 2)
        gemm_flops = 2.0 * m**3 / statistics.median(timed(lambda: mm(x, x), 3))
        src = jnp.ones((64 << 20,), jnp.float32)
        cp = jax.jit(lambda s: s + 0.0)
        timed(lambda: cp(src), 2)
        copy_bw = 2.0 * src.size * 4 / statistics.median(timed(lambda: cp(src), 3))
        del x, src
    print(
        f"machine device=cpu impl=xla-official jax={jax.__version__} threads={os.cpu_count()} "
        f"gemm_f32_gflops={gemm_flops / 1e9:.1f} copy_gbps={copy_bw / 1e9:.1f}",
        flush=True,
    )

    o, i, n, r, g, t = SHAPES[a.shape]
    o1, o2 = default_pair(o)
    i1, i2 = default_pair(i)

    def curvature(base, experts, fa, fb, fc, fd):
        # The official formulation: tau broadcast to [R, N, O, I] and four mode products on the 6-D view.
        tau = experts - base
        x = jnp.broadcast_to(tau[None], (r, n, o, i)).reshape(r, n, o1, o2, i1, i2)
        x = jnp.einsum("rnak,rnkbcd->rnabcd", fa, x)
        x = jnp.einsum("rnbk,rnakcd->rnabcd", fb, x)
        x = jnp.einsum("rnck,rnabkd->rnabcd", fc, x)
        x = jnp.einsum("rndk,rnabck->rnabcd", fd, x)
        return x.sum(0).reshape(n, o, i)

    def merge_official(base, p, scores):
        return base + (scores[:, :, None, None] * p[None]).sum(1)  # [G, N, O, I] gating, alpha = 1

    def merge_einsum(base, p, scores):
        return base + jnp.einsum("gn,noi->goi", scores, p)

    def ca_merge_with(merge):
        return lambda base, experts, scores, fa, fb, fc, fd: merge(
            base, curvature(base, experts, fa, fb, fc, fd), scores
        )

    rng = np.random.default_rng(0xCA3E)

    def rnd(*shape, scale=1.0):
        return jnp.asarray((rng.random(shape, dtype=np.float32) * 2 - 1) * scale)

    def eye(k):
        e = np.broadcast_to(np.eye(k, dtype=np.float32), (r, n, k, k))
        return jnp.asarray(e + 0.01 * rng.random((r, n, k, k), dtype=np.float32))

    def scores_():
        s = 1.0 + 0.5 * rng.random((g, n), dtype=np.float32)
        return jnp.asarray(s / s.sum(-1, keepdims=True))

    def inputs(op, gating):
        merge = merge_official if gating == "official" else merge_einsum
        base = rnd(o, i, scale=0.05)
        if op in ("ca_merge", "curvature"):
            experts = base + rnd(n, o, i, scale=0.01)
            f = [eye(o1), eye(o2), eye(i1), eye(i2)]
            if op == "ca_merge":
                return ca_merge_with(merge), [base, experts, scores_(), *f], (g, o, i)
            return (lambda b, e, *ff: curvature(b, e, *ff)), [base, experts, *f], (n, o, i)
        return merge, [base, rnd(n, o, i, scale=0.01), scores_()], (g, o, i)

    ops = ["ca_merge", "curvature", "merge"] if a.op == "all" else [a.op]
    passes = ["fwd", "fwd+bwd"] if a.pas == "all" else [a.pas]
    gatings = ["official", "einsum"] if a.gating == "both" else [a.gating]
    cases = [
        (op, pas, gating)
        for op in ops
        for pas in passes
        for gating in (gatings if op != "curvature" else ["official"])
    ]
    for op, pas, gating in cases:
        fn, xs, out_shape = inputs(op, gating)
        if pas == "fwd":
            step = jax.jit(fn)
            args = xs
        else:
            grad_out = rnd(*out_shape)

            def loss(*v):
                return jnp.sum(fn(*v) * grad_out)

            # Gradients of every input, like the candle peer's autograd and camex's backward.
            step = jax.jit(jax.grad(loss, argnums=tuple(range(len(xs)))))
            args = xs
        compiled = step.lower(*args).compile()
        try:
            ma = compiled.memory_analysis()
            peak = ma.temp_size_in_bytes + ma.output_size_in_bytes
        except Exception:  # memory analysis is optional in some jaxlib builds
            peak = float("nan")
        timed(lambda: compiled(*args), 1)
        ts = timed(lambda: compiled(*args), a.iters)
        med = statistics.median(ts)
        flop, nbytes = cost(op, a.shape, pas, 4)
        floor = max(flop / gemm_flops, nbytes / copy_bw)
        print(
            f"op={op} shape={a.shape} device=cpu dtype=f32 pass={pas} median_ms={med * 1e3:.4f} "
            f"gflops={flop / med / 1e9:.2f} floor_ms={floor * 1e3:.4f} peak_mem_mb={peak / 2**20:.1f} "
            f"impl=xla-{gating} gbps={nbytes / med / 1e9:.2f} x_floor={med / floor:.2f}",
            flush=True,
        )
        del fn, xs, step, compiled, args
    return 0


if __name__ == "__main__":
    sys.exit(main())
