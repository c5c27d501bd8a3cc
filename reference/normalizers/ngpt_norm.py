"""nGPT's normalized residual update (Loshchilov, Hsieh, Sun & Ginsburg, ICLR 2025, arXiv:2410.01131).

nGPT keeps every hidden state on the unit hypersphere.  A block's contribution moves the state
toward the block's own (normalized) output by a learnable, per-dimension step, the "eigen
learning rates" alpha, and the result is projected back on the sphere (Sec. 2.2.2 of the paper;
the official code NVIDIA/ngpt ``model.py::Block.forward``, the same lines for the attention and
the MLP block).  With Norm(v) = v / ||v||_2 over the d features of each vector (no eps: the
official ``justnorm``, whose ``F.normalize`` call is commented out):

    A = Norm(h)                          the current state (official: re-normalized)        (1)
    B = Norm(h_block)                    the block's output on the sphere                   (2)
    lr = |alpha * (alpha_init / alpha_scale)|      the effective eigen learning rates       (3)
    y = Norm(A + lr (B - A))             a step from A toward B, back on the sphere         (4)

(4) is the paper's ``h <- Norm(h + alpha_A (h_A - h))`` with h_A = Norm(ATTN(h)) (and the same
with alpha_M and the MLP).  Equation numbers here are this module's: the paper's text was not
available, the formulas are the official code's.

Parameterization of alpha (3).  The stored parameter is initialized to alpha_scale and scaled by
alpha_init / alpha_scale in the forward pass, so the effective rate starts at alpha_init (0.05)
while the optimizer sees a parameter of size alpha_scale: the official ``attn_alpha_init_value
= 0.05``, ``attn_alpha_init_scaling = config.base_scale`` = 1/sqrt(n_embd) (``alpha_scale =
None`` here: 1/sqrt(d)).  The official code takes the absolute value (``torch.abs(lr)``;
``alpha_abs = False`` drops it).  d|a c|/da = c sign(a c), 0 at a = 0 (torch's ``abs`` gradient).

``normalize_h`` (official: True, the code's comment says "normally, normalization is not
needed"): h is normalized again in (1).  On a unit h both choices give the same y; the gradient
w.r.t. h differs (with (1) it is projected on the tangent plane at A).  ``normalize_h = False``
uses A = h as the paper's equation writes it.

Zero vectors.  The official justnorm divides by ||v|| without eps, so a zero h, h_block or
A + lr (B - A) gives 0/0 = NaN in every component of its row; the oracle follows that
convention (y and the gradients are NaN in that row), where ``l2_normalize`` (eps = 0) returns 0.
The norms are the overflow-safe ``_stats.l2_norm`` that ``l2_normalize`` uses.

B - A is formed from h_block - h and the difference of the norms (``_difference``), not from
the two rounded unit vectors: for nearly parallel h and h_block (states at a common offset) the
naive ``B - A`` keeps only their roundings, 1e-5 relative for vectors at 1e8 with spread 1e-3.

Backward (exact).  For u = Norm(v), r = ||v||: du/dv = (I - u u^T) / r, so the VJP of a cotangent
w is ``(w - u <u, w>) / r`` (``sphere_vjp``; the derivation is in reference/normalizers/
l2_normalize.py).  With dres the VJP of (4)'s outer Norm at res = A + lr (B - A):

    dA = (1 - lr) dres,   dB = lr dres,   d lr = sum over the rows of dres (B - A)
    dalpha = d lr * c * sign(alpha c),  c = alpha_init / alpha_scale   (alpha_abs = False: d lr * c)
    dh = sphere_vjp(dA at A) (normalize_h) or dA,   dh_block = sphere_vjp(dB at B)

The post-step weight projection of nGPT (every matrix's rows or columns back on the sphere after
each optimizer step) is optimizer-side: reference/optimizers/ngpt_projection.py.
"""

from __future__ import annotations

import math
from typing import Any

from reference._backend import namespace
from reference._common import check_ndim, check_nonempty, check_shape
from reference.normalizers._stats import l2_norm, sum_over
from reference.registry import oracle_function, oracle_vjp

OP = "ngpt_norm"


def justnorm(v: Any, axis: int = -1) -> tuple[Any, Any]:
    """``(v / ||v||, ||v||)`` over ``axis`` (the norm keepdims), eps-free: a zero vector gives NaN
    (0/0) in every component, as the official ``justnorm``; the norm is overflow-safe."""
    xp = namespace(v)
    r = l2_norm(v, (axis,))
    zero = r == 0
    safe = xp.where(zero, xp.ones_like(r), r)
    u = xp.where(zero, xp.full_like(v, math.nan), v / safe)
    return u, r


def sphere_vjp(w: Any, u: Any, r: Any, axis: int = -1) -> Any:
    """The VJP of ``u = v / ||v||`` (``r = ||v||``, keepdims) for the cotangent w: the projection
    of w on the tangent plane at u, divided by r."""
    xp = namespace(w)
    safe = xp.where(r == 0, xp.ones_like(r), r)  # a zero vector: u is NaN already
    return (w - u * xp.sum(u * w, axis=axis, keepdims=True)) / safe


def _check(h: Any, h_block: Any, alpha: Any) -> int:
    """h and h_block of the same shape (..., d), alpha (d,); returns d."""
    check_ndim(OP, "h", h, min_ndim=1)
    check_nonempty(OP, "h", h)
    d = int(h.shape[-1])
    check_shape(OP, "alpha", alpha, (d,), f"one eigen learning rate per feature: h has {d} on its last axis")
    check_shape(OP, "h_block", h_block, tuple(h.shape), "the block's output has the shape of h")
    return d


def rate_factor(d: int, alpha_init: float, alpha_scale: float | None) -> float:
    """c = alpha_init / alpha_scale of Eq. (3), alpha_scale = 1/sqrt(d) (the official base_scale)
    when None."""
    scale = 1.0 / math.sqrt(d) if alpha_scale is None else alpha_scale
    return alpha_init / scale


def _difference(h: Any, h_block: Any, a: Any, r_a: Any, b: Any, r_b: Any) -> Any:
    """B - A = Norm(h_block) - Norm(h) without the cancellation of two rounded unit vectors.

    When h and h_block point almost the same way (hidden states at a common offset) B - A is
    tiny and ``b - a`` keeps only the roundings of b and a.  Written as

        B - A = (h_block - h)/||h_block|| + A (||h|| - ||h_block||)/||h_block||,
        ||h|| - ||h_block|| = <h - h_block, h + h_block> / (||h|| + ||h_block||),

    it starts from the difference of the inputs (exact when they are close: Sterbenz) and never
    subtracts the rounded norms; the inner product is scaled by s = max|h, h_block| per row so
    it neither overflows nor underflows.  Its error is a few ulps of ||h - h_block||/||h_block||,
    which bounds |B - A| (up to a factor 3) where the norms are within a factor 2 of each other;
    other rows (far apart in length: the terms would cancel instead), zero and non-finite rows
    keep ``b - a`` (a few ulps absolute).
    """
    xp = namespace(h)
    diff = h - h_block
    s = xp.maximum(xp.max(xp.abs(h), axis=-1, keepdims=True), xp.max(xp.abs(h_block), axis=-1, keepdims=True))
    ok = (r_a > 0) & (r_b > 0) & (s < math.inf) & (r_a <= 2.0 * r_b) & (r_b <= 2.0 * r_a)
    s = xp.where(ok, s, xp.ones_like(s))
    norm_gap = s * (xp.sum((diff / s) * ((h + h_block) / s), axis=-1, keepdims=True) / ((r_a + r_b) / s))
    safe_rb = xp.where(ok, r_b, xp.ones_like(r_b))
    accurate = (a * norm_gap - diff) / safe_rb
    return xp.where(ok, accurate, b - a)


def _forward(h: Any, h_block: Any, alpha: Any, alpha_init: float, alpha_scale: float | None,
             alpha_abs: bool, normalize_h: bool) -> dict[str, Any]:
    xp = namespace(h)
    c = rate_factor(int(h.shape[-1]), alpha_init, alpha_scale)
    raw = alpha * c
    lr = xp.abs(raw) if alpha_abs else raw                                        # Eq. (3)
    if normalize_h:
        a, r_a = justnorm(h)                                                      # Eq. (1)
    else:
        a, r_a = h, None
    b, r_b = justnorm(h_block)                                                    # Eq. (2)
    step = _difference(h, h_block, a, r_a, b, r_b) if normalize_h else b - a
    res = a + lr * step
    y, r_y = justnorm(res)                                                        # Eq. (4)
    return {"a": a, "r_a": r_a, "b": b, "r_b": r_b, "step": step, "lr": lr, "raw": raw, "c": c, "y": y,
            "r_y": r_y}


@oracle_function(OP)
def ngpt_norm(
    h: Any,
    h_block: Any,
    alpha: Any,
    *,
    alpha_init: float = 0.05,
    alpha_scale: float | None = None,
    alpha_abs: bool = True,
    normalize_h: bool = True,
) -> Any:
    """``Norm(A + lr (Norm(h_block) - A))`` with A = Norm(h) and lr of Eq. (3); rows on the last axis."""
    _check(h, h_block, alpha)
    return _forward(h, h_block, alpha, alpha_init, alpha_scale, alpha_abs, normalize_h)["y"]


@oracle_vjp(OP)
def ngpt_norm_vjp(
    dy: Any,
    h: Any,
    h_block: Any,
    alpha: Any,
    *,
    alpha_init: float = 0.05,
    alpha_scale: float | None = None,
    alpha_abs: bool = True,
    normalize_h: bool = True,
) -> dict[str, Any]:
    """Gradients of ``<dy, y>`` w.r.t. h, h_block and alpha (module docstring)."""
    xp = namespace(h)
    _check(h, h_block, alpha)
    check_shape(OP, "dy", dy, tuple(h.shape), "the cotangent of y has the shape of h")
    f = _forward(h, h_block, alpha, alpha_init, alpha_scale, alpha_abs, normalize_h)
    d_res = sphere_vjp(dy, f["y"], f["r_y"])
    d_a = (1.0 - f["lr"]) * d_res
    d_b = f["lr"] * d_res
    d_lr = sum_over(d_res * f["step"], tuple(range(h.ndim - 1)))
    # d|a c|/da = c sign(a c): sign(0) = 0, torch's gradient of abs at 0.
    d_alpha = d_lr * f["c"] * (xp.sign(f["raw"]) if alpha_abs else xp.ones_like(f["raw"]))
    d_h = sphere_vjp(d_a, f["a"], f["r_a"]) if normalize_h else d_a
    return {"h": d_h, "h_block": sphere_vjp(d_b, f["b"], f["r_b"]), "alpha": d_alpha}
