"""L2 normalization: each row divided by its Euclidean norm (unit vectors, "hypersphere" features).

Per row, over the n values of the normalized axes R:

    ||x|| = sqrt(sum_{i in R} x_i^2)
    y     = x / max(||x||, floor)

No paper owns the op; nGPT (arXiv:2410.01131) normalizes every hidden state with it and no eps
(the official ``justnorm(x) = x / x.norm(p=2, dim=-1)``), MsgNorm (DeeperGCN, arXiv:2006.07739)
normalizes messages with ``F.normalize``.  The frameworks differ in where eps bounds the
denominator, the knob ``eps_clamps`` (both clamp, none adds):

* ``"norm"``: ``x / max(||x||, eps)``.  PyTorch ``F.normalize`` (``norm(...).clamp_min(eps)``,
  eps 1e-12) and ``keras.ops.normalize`` (``x * min(rsqrt(sum x^2), 1/eps)``, eps 1e-7): floor = eps.
* ``"squared_norm"``: ``x * rsqrt(max(sum x^2, eps))``.  TensorFlow ``tf.math.l2_normalize`` and
  Keras ``UnitNormalization`` (eps 1e-12): since rsqrt(max(s, eps)) = 1 / max(sqrt(s), sqrt(eps)),
  this is the same op with floor = sqrt(eps) (1e-6 for the default 1e-12, not 1e-12).

eps = 0 is plain ``x / ||x||`` in both forms (ONNX ``LpNormalization`` p=2, nGPT).

Zero rows: with eps > 0 a zero row is clamped and maps to 0 / floor = 0 exactly (torch: 0 / eps;
TF: 0 * rsqrt(eps)).  With eps = 0 it is 0/0; the oracle returns 0, the value ONNX defines since
onnx/onnx#7618 (nGPT's code and the older ONNX reference produce NaN there).  A NaN anywhere in a
row makes the whole row NaN; an infinite entry gives an infinite norm, so its row is NaN at the
infinity and 0 elsewhere, as in PyTorch and TensorFlow.

Overflow-safe norm: ``||x|| = s * sqrt(sum (x/s)^2)`` with s = max|x| over the row
(``_stats.l2_norm``), so every square lies in [0, 1]: rows near 1e200 do not overflow and rows near
1e-200 do not underflow to a zero norm (a plain ``sum(x^2)`` does both; TensorFlow's form then
returns 0 for a 1e200 row, and x / sqrt(eps) instead of a unit vector for a 1e-200 row with eps = 0).
The one limit left is the norm itself: it must be below the float64 maximum, 1.8e308.

Backward.  Unclamped rows (||x|| >= floor): y = x / r with r = ||x||, d r / d x_j = x_j / r = y_j,

    d y_i / d x_j = delta_ij / r - x_i y_j / r^2 = (delta_ij - y_i y_j) / r,
    dx_j = sum_i dy_i (delta_ij - y_i y_j) / r = (dy_j - y_j <y, dy>) / r,

the tangent-plane projection of dy at y, divided by the norm; hence <dx, y> = <y, dy>(1 - ||y||^2)/r
= 0.  Clamped rows (||x|| < floor): the denominator is the constant floor, y = x / floor and

    dx = dy / floor       (torch: dy / eps; TF: dy * rsqrt(eps)).

At the kink ||x|| = floor the unclamped branch is taken, as ``clamp_min`` and ``tf.maximum`` route
the gradient of a tie to the norm.  With eps = 0 a zero row has no derivative (x / ||x|| is not
continuous at 0): its dx is NaN.

Accuracy: no cancellation.  x/s rounds once, the k squares and their sum add k roundings, the root
halves them, s * root and x / norm one each: y is within ((k + 1)/2 + 3) u of x / ||x|| (relative).
"""

from __future__ import annotations

import math
from typing import Any

from reference._backend import namespace
from reference._common import check_feature_params, check_shape
from reference.normalizers._stats import l2_norm
from reference.registry import oracle_function, oracle_vjp

OP = "l2_normalize"


def _divisor(x: Any, axes: tuple[int, ...], eps: float, eps_clamps: str) -> tuple[Any, Any]:
    """``(denominator, clamped)``: max(||x||, floor) per row (keepdims) and where the floor won."""
    xp = namespace(x)
    norm = l2_norm(x, axes)
    # rsqrt(max(s, eps)) = 1 / max(sqrt(s), sqrt(eps)): both forms clamp the norm, at different floors.
    floor = eps if eps_clamps == "norm" else math.sqrt(eps)
    clamped = norm < floor  # False for a NaN norm, which then propagates through the division
    return xp.where(clamped, xp.full_like(norm, floor), norm), clamped


def _normalize(x: Any, denominator: Any) -> tuple[Any, Any, Any]:
    """``(y, zero, safe)``: y = x / denominator, 0 where it is 0 (eps = 0 and a zero row)."""
    xp = namespace(x)
    zero = denominator == 0
    safe = xp.where(zero, xp.ones_like(denominator), denominator)
    return xp.where(zero, xp.zeros_like(x), x / safe), zero, safe


@oracle_function(OP)
def l2_normalize(
    x: Any,
    *,
    axes: tuple[int, ...] = (-1,),
    eps: float = 1e-12,
    eps_clamps: str = "norm",
) -> Any:
    """``x / max(||x||, floor)`` over ``axes``; floor = eps (``"norm"``) or sqrt(eps)."""
    axes = check_feature_params(OP, x, axes, {})
    denominator, _ = _divisor(x, axes, eps, eps_clamps)
    return _normalize(x, denominator)[0]


@oracle_vjp(OP)
def l2_normalize_vjp(
    dy: Any,
    x: Any,
    *,
    axes: tuple[int, ...] = (-1,),
    eps: float = 1e-12,
    eps_clamps: str = "norm",
) -> dict[str, Any]:
    """Gradient of ``<dy, y>`` w.r.t. x."""
    xp = namespace(x)
    axes = check_feature_params(OP, x, axes, {})
    check_shape(OP, "dy", dy, tuple(x.shape), "the cotangent of y has the shape of x")
    denominator, clamped = _divisor(x, axes, eps, eps_clamps)
    y, zero, safe = _normalize(x, denominator)
    # Unclamped: remove dy's component along y (the norm's own derivative); clamped: a constant.
    along_y = xp.sum(y * dy, axis=axes, keepdims=True)
    dx = xp.where(clamped, dy, dy - y * along_y) / safe
    # eps = 0 and a zero row: x / ||x|| has no derivative at 0.
    return {"x": xp.where(zero, xp.full_like(dx, math.nan), dx)}
