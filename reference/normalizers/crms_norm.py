"""Compressed RMSNorm (Jiang, Gu, Zhu & Pan, 2023, arXiv:2305.14858, "Pre-RMSNorm and Pre-CRMSNorm
Transformers: Equivalent and Efficient Pre-LN Transformers").

The paper's chain of equivalences for a Pre-LN Transformer with main-branch vectors v in R^d:

1. Pre-LN -> Pre-RMSNorm.  LayerNorm only sees ``v - mean(v)``; if the main branch is kept
   zero-mean (the embeddings and every residual branch's output linear re-centered), LayerNorm of a
   zero-mean z is RMSNorm of z (mean 0 makes the biased variance the mean square).
2. Pre-RMSNorm -> Pre-CRMSNorm.  A zero-mean z in R^d is fixed by its first d - 1 coordinates,
   since z_d = -sum_{i<d} z_i: ``compress(z) = z[..., :-1]`` is lossless on zero-mean vectors and
   ``decompress(x) = concat(x, -sum(x))`` inverts it.  CRMSNorm is RMSNorm of the decompressed
   vector, written on the compressed one (x in R^(d-1), the dropped element -sum x restored
   inside the statistic only):

       CRMSNorm(x) = x / sqrt( (sum_{i<d} x_i^2 + (sum_{i<d} x_i)^2) / d + eps ),   d = m + 1

   for x with m = d - 1 features on the last axis.  Then
   ``decompress(CRMSNorm(x)) = RMSNorm(decompress(x))`` and, for any v,
   ``LayerNorm(v) = decompress(CRMSNorm(compress(v - mean v)))`` (same eps).  The linears that read
   the main branch absorb the decompression: ``W @ decompress(x) = (W[:, :-1] - W[:, -1:]) @ x``
   (:func:`compress_input_weight`).

Official code (ZixuanJiang/pre-rmsnorm-transformer, torch/customized_layer.py ``crms_norm`` and
example.py, commit 025d43a): ``x * rsqrt((x.square().sum(-1) + x.sum(-1).square()) / (x.shape[-1] + 1)
+ eps)`` over the last axis, no affine (the gain and bias of the LayerNorm it replaces are folded
into the next linear), eps inside the root: 1e-5 in torch (the module subclasses nn.LayerNorm and
reads its eps; example.py's default), 1e-6 in jax/model.py.  Hence one hyper-parameter, ``eps``.

Backward.  With q = (sum x^2 + S^2)/d + eps, S = sum_i x_i, r = 1/sqrt(q), y = x r:
d q / d x_j = 2 (x_j + S) / d, so d r / d x_j = -r^3 (x_j + S) / d and

    dx_j = r * ( dy_j - (y_j + S r) * (1/d) sum_i dy_i y_i ).

The term ``S r = sum_i y_i`` is the restored coordinate's share: it is what a CRMSNorm written as
plain RMSNorm over the m compressed coordinates (no (sum x)^2 term) would lack.  Equivalently it
is RMSNorm's VJP in R^d (``_stats.rms_vjp``) chained through decompress, whose transpose maps
(g, g_d) to g - g_d.  With eps = 0, ``sum_j x_j dx_j = 0`` (scale invariance); in general
``sum_j x_j dx_j = eps r^2 sum_i dy_i y_i``.

At d = 2 (one feature) the form above is ``r (1 - y^2) dy`` and cancels where |y| -> 1; the VJP
uses the equivalent ``eps r^3 dy`` there.  For d > 2 only the radial component of dx (size
``eps r^2``) is affected, which is small against the whole gradient, so the result stays
normwise accurate.

Accuracy: every term of q is non-negative, so q is accurate to a few ulps whatever the data (the
sum S itself may cancel, but its absolute error, a few ulps of sum |x_i|, moves S^2 by less than
m ulps of sum x_i^2).  Squares are not rescaled: |x| must stay below about 1e154 / m (S^2 <= m
sum x^2) and above about 1e-154 for the squares to stay normal.
"""

from __future__ import annotations

from typing import Any

from reference._backend import namespace
from reference._common import check_ndim, check_nonempty, check_shape, fail
from reference.registry import oracle_function, oracle_vjp

OP = "crms_norm"


def _check(x: Any) -> int:
    """x has at least one feature on the last axis; returns d = m + 1, the decompressed length."""
    check_ndim(OP, "x", x, min_ndim=1)
    check_nonempty(OP, "x", x)
    return int(x.shape[-1]) + 1


def _normalize(x: Any, d: int, eps: float) -> tuple[Any, Any, Any]:
    """``(y, r, S)``: y = x r with r = 1/sqrt((sum x^2 + S^2)/d + eps), S = sum x (keepdims)."""
    xp = namespace(x)
    s = xp.sum(x, axis=-1, keepdims=True)  # minus the dropped coordinate of the zero-mean vector
    q = (xp.sum(x * x, axis=-1, keepdims=True) + s * s) / d + eps
    r = 1.0 / xp.sqrt(q)
    return x * r, r, s


@oracle_function(OP)
def crms_norm(x: Any, *, eps: float = 1e-5) -> Any:
    """Compressed RMS normalization of ``x`` over its last axis; returns ``y`` (the shape of x)."""
    d = _check(x)
    y, _, _ = _normalize(x, d, eps)
    return y


@oracle_vjp(OP)
def crms_norm_vjp(dy: Any, x: Any, *, eps: float = 1e-5) -> dict[str, Any]:
    """Gradient of ``<dy, y>`` w.r.t. x (module docstring)."""
    xp = namespace(x)
    d = _check(x)
    check_shape(OP, "dy", dy, tuple(x.shape), "the cotangent of y has the shape of x")
    y, r, s = _normalize(x, d, eps)
    if d == 2:
        # One compressed feature: y = x / sqrt(x^2 + eps), dy/dx = r - x^2 r^3 = eps r^3.  The
        # general form computes that as r (1 - y^2) and loses log10(x^2 / eps) digits to the
        # cancellation where y saturates at +-1 (1e-10 relative at eps = 1e-6).
        return {"x": dy * (eps * r * r * r)}
    coupling = xp.sum(dy * y, axis=-1, keepdims=True) / d  # (1/d) sum_i dy_i y_i
    return {"x": r * (dy - (y + s * r) * coupling)}


# --- the lossless compression of zero-mean vectors (Sec. 3 of the paper, example.py) ------------


def decompress(x: Any) -> Any:
    """The zero-mean d-vector a compressed (d-1)-vector encodes: ``concat(x, -sum(x))`` on the
    last axis."""
    xp = namespace(x)
    return xp.concat([x, -xp.sum(x, axis=-1, keepdims=True)], axis=-1)


def compress(z: Any) -> Any:
    """``z[..., :-1]``: lossless for zero-mean z (the last coordinate is minus the sum of the
    others).  z must have at least 2 features."""
    if z.ndim < 1 or int(z.shape[-1]) < 2:
        fail(OP, f"compress needs at least 2 features on the last axis, got shape {tuple(z.shape)}")
    return z[..., :-1]


def compress_input_weight(w: Any) -> Any:
    """A linear's weight (out, d) reading the main branch, for the compressed branch: (out, d-1)
    ``W[:, :-1] - W[:, -1:]``, so that ``W @ decompress(x) = compress_input_weight(W) @ x``."""
    if w.ndim != 2 or int(w.shape[-1]) < 2:
        fail(OP, f"compress_input_weight needs a (out, d) weight with d >= 2, got shape {tuple(w.shape)}")
    return w[:, :-1] - w[:, -1:]
