"""Layer Normalization (Ba, Kiros & Hinton, 2016, arXiv:1607.06450).

Per row (one training case), over the H values of the normalized axes R (Sec. 3, Eq. 3):

    mu    = (1/H) sum_{i in R} a_i,      sigma^2 = (1/H) sum_{i in R} (a_i - mu)^2   (biased)
    x_hat = (a - mu) / sqrt(sigma^2 + eps)
    y     = g * x_hat + b                                        (Eq. 4: gain g, bias b)

There is no running state: training and inference compute the same thing.

Conventions (keyword hyper-parameters):

* ``axes``: the normalized axes R, default ``(-1,)``.  PyTorch's ``normalized_shape`` of length k
  is ``axes = (-k, ..., -1)``; ONNX ``LayerNormalization(axis=a)`` is ``axes = (a, ..., r-1)``;
  Keras accepts any list of axes.  ``weight`` (g) and ``bias`` (b) have the shape of x on the
  normalized axes, taken in increasing axis order (``x.shape[a] for a in sorted(axes)``), and
  broadcast over the other axes.
* ``eps``: added to the biased variance *inside* the square root, as every framework does.  The
  paper's equations have no eps; the default 1e-5 is PyTorch's and ONNX's (Flax 1e-6, Keras 1e-3,
  BERT 1e-12).

Backward.  With ``h = dy * g`` (elementwise, before any reduction), the statistics take part in
the gradient, so dx is VJP-STD over R (normalizers.md §0, derived in ``_stats``):

    dx = inv_std * (h - mean_R(h) - x_hat * mean_R(h * x_hat)),   inv_std = 1/sqrt(sigma^2 + eps)

since d x_hat_i / d a_j = inv_std (delta_ij - 1/H) - inv_std x_hat_i x_hat_j / H.  The affine
parameters are shared by every row, so their gradients sum over the non-normalized axes:
``dg = sum dy * x_hat``, ``db = sum dy``.

Accuracy: the centered values come from ``_stats.centered_moments`` (a shifted two-pass mean), so
rows near a large offset (mean 1e8, std 1e-3) keep full relative accuracy in ``a - mu``.  Squares
are not rescaled: ``|a - mu|`` must stay below about 1e154 / sqrt(H).
"""

from __future__ import annotations

from typing import Any

from reference._common import check_feature_params, check_shape
from reference.normalizers._stats import affine, expand_to, other_axes, standardize, standardize_vjp, sum_over
from reference.registry import oracle_function, oracle_vjp

OP = "layer_norm"


def _check(x: Any, weight: Any, bias: Any, axes: tuple[int, ...]) -> tuple[int, ...]:
    return check_feature_params(OP, x, axes, {"weight": weight, "bias": bias})


@oracle_function(OP)
def layer_norm(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    *,
    axes: tuple[int, ...] = (-1,),
    eps: float = 1e-5,
) -> Any:
    """Layer normalization of ``x`` over ``axes``; returns ``y`` (the shape of x)."""
    axes = _check(x, weight, bias, axes)
    x_hat, _, _, _ = standardize(x, axes, eps)  # Eq. 3 and the normalization of Eq. 4
    return affine(x_hat, weight, bias, axes)


@oracle_vjp(OP)
def layer_norm_vjp(
    dy: Any,
    x: Any,
    weight: Any = None,
    bias: Any = None,
    *,
    axes: tuple[int, ...] = (-1,),
    eps: float = 1e-5,
) -> dict[str, Any]:
    """Gradients of ``<dy, y>`` w.r.t. x, weight and bias (those given)."""
    axes = _check(x, weight, bias, axes)
    check_shape(OP, "dy", dy, tuple(x.shape), "the cotangent of y has the shape of x")
    x_hat, inv_std, _, _ = standardize(x, axes, eps)
    # h = dL/dx_hat: the gain multiplies elementwise before the row reductions of VJP-STD.
    h = dy if weight is None else dy * expand_to(weight, x.ndim, axes)
    grads = {"x": standardize_vjp(h, x_hat, inv_std, axes)}
    shared = other_axes(x.ndim, axes)  # g and b are reused by every row: their grads sum there
    if weight is not None:
        grads["weight"] = sum_over(dy * x_hat, shared)
    if bias is not None:
        grads["bias"] = sum_over(dy, shared)
    return grads
