"""What the PyTorch and JAX baselines share: the shapes of SPEC section 8, the default Kronecker
split and the cost model of `camex bench` (benches/common/mod.rs `cost`), so their floors match."""

import math

SHAPES = {
    # O, I of `wi`; N; R; G; T  (SPEC section 8)
    "t5-small": (2048, 512, 7, 8, 16, 128),
    "t5-base": (3072, 768, 7, 8, 16, 128),
    "gpt2": (3072, 768, 7, 8, 32, 256),
    "minilm": (1536, 384, 7, 8, 32, 128),
}


def default_pair(n):
    """o1 = the largest divisor of n not above floor(sqrt(n)) (SPEC section 2)."""
    d = max(1, math.isqrt(n))
    while n % d:
        d -= 1
    return d, n // d


def cost(op, shape, pas, elem):
    """FLOP and bytes of SPEC section 8 (same model as benches/common/mod.rs `cost`)."""
    o, i, n, r, g, t = SHAPES[shape]
    o1, o2 = default_pair(o)
    i1, i2 = default_pair(i)
    oi = o * i
    kron = 2.0 * n * r * oi * (o1 + o2 + i1 + i2)
    mergef = 2.0 * g * n * oi
    bwd = pas == "fwd+bwd"
    if op == "curvature":
        flop = 3 * kron if bwd else kron
        elems = (2 * n + 1) * oi * (2 if bwd else 1)
    elif op == "merge":
        flop = 3 * mergef if bwd else mergef
        elems = (n + 1 + g) * oi * (2 if bwd else 1)
    elif op == "ca_merge":
        flop = 3 * (kron + mergef) if bwd else kron + mergef
        elems = (n + 1 + g) * oi * (2 if bwd else 1)
    elif op == "merged_linear":
        lin = 2.0 * g * t * oi
        e = g * t * i + g * oi + g * t * o
        flop, elems = (3 * lin, 2 * e) if bwd else (lin, e)
    else:
        raise ValueError(op)
    return flop, elems * elem
