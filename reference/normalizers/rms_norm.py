"""Root Mean Square Layer Normalization (Zhang & Sennrich, 2019, arXiv:1910.07467).

Per row, over the n values of the normalized axes R (Eq. 4 of the paper):

    RMS(a) = sqrt((1/n) sum_{i in R} a_i^2)
    a_bar  = a / RMS(a) * g            (+ an optional offset b, the official code's ``bias=True``)

Unlike LayerNorm there is no mean: RMSNorm is invariant to rescaling a row, not to shifting it.
Partial RMSNorm (pRMSNorm, Sec. 4) estimates the RMS from the first k = int(n * p) values only,
``RMS_p(a) = sqrt((1/k) sum_{i<k} a_i^2)``, and still divides *all* n values by it.

Conventions (keyword hyper-parameters):

* ``axes``: the normalized axes (default ``(-1,)``); weight and bias have the shape of x there.
* ``eps`` and ``eps_placement``.  The paper's equations have no eps.  The two official files
  disagree (bzhangGo/rmsnorm, checked against the official code):

  - ``"inside"``: ``a * rsqrt(ms + eps)`` with ``ms = mean(a^2)``; rmsnorm_tensorflow.py
    (eps 1e-8) and every snippet the official README gives for the paper's experiments (Nematus
    TF and Theano ``x / sqrt(mean(x*x) + 1e-5)``, layers.py ``rln``, the CIFAR lasagne layer with
    1e-6).  PyTorch, Flax, Keras, ONNX and Hugging Face all use this placement.
  - ``"outside"``: ``a / (RMS(a) + eps)``; rmsnorm_torch.py (eps 1e-8).

  The default is ``"inside"``, the placement of the code the paper's results came from, with
  the official default eps = 1e-8.
* ``weight_offset``: the gain is ``weight_offset + weight``.  0 is the paper; 1 is Gemma's
  ``x * (1 + w)`` with zero-initialized w.  Without a weight there is no gain at all.
* ``p``: pRMSNorm.  Negative (default -1) disables it (the official code disables it for p < 0 or
  p > 1; p > 1 is refused here).  Otherwise k = int(n * p) must be >= 1 and the op must normalize
  a single axis (the official code splits the last axis).

Backward (h = dy * gain elementwise; K the first k positions of the axis, K = R without p;
sums over R).

* inside: r = sqrt(ms_K + eps), x_hat = a / r.  d r / d a_j = [j in K] a_j / (k r), so

      dx_j = (1/r) * (h_j - [j in K] x_hat_j * (1/k) sum_i h_i x_hat_i).

  Without p this is VJP-RMS (normalizers.md §0).  The direct term h_j / r reaches every
  coordinate; the term through the statistic only the first k (normalizers.md §1.5).
* outside: rho = RMS_K(a) (no eps), r' = rho + eps, x_hat = a / r'.  d rho / d a_j =
  [j in K] a_j / (k rho), so with x_tilde = a / rho

      dx_j = (1/r') * (h_j - [j in K] x_tilde_j * (1/k) sum_i h_i x_hat_i),

  i.e. normalizers.md §1.5's ``h/r' - x (sum h x) / (r'^2 ||x|| sqrt(n))`` (k rho = ||x_K|| sqrt(k)).
  At rho = 0 (the first k values all zero) the norm is not differentiable; the term is taken as 0,
  the subgradient PyTorch's ``norm`` backward uses.
* ``dweight = sum dy * x_hat``, ``dbias = sum dy`` over the non-normalized axes.

Accuracy: ``mean(a^2)`` has no cancellation, so the forward is accurate to a few ulps.  Squares are
not rescaled: |a| must stay below about 1e154 / sqrt(n) (1e150 data give mean squares near 1e300,
still finite in float64) and above about 1e-154 for the squares to stay normal numbers.
"""

from __future__ import annotations

from typing import Any

from reference._backend import device, namespace
from reference._common import check_feature_params, check_shape, fail
from reference.normalizers._stats import expand_to, other_axes, reduction_size, sum_over
from reference.registry import oracle_function, oracle_vjp

OP = "rms_norm"


def _check(x: Any, weight: Any, bias: Any, axes: tuple[int, ...], p: float) -> tuple[tuple[int, ...], int]:
    """Validate shapes; return the normalized axes and k, the number of values in the statistic."""
    axes = check_feature_params(OP, x, axes, {"weight": weight, "bias": bias})
    n = reduction_size(x, axes)
    if p < 0:
        return axes, n
    if len(axes) != 1:
        fail(OP, f"partial RMSNorm (p={p}) needs a single normalized axis, got axes={axes}")
    k = int(n * p)  # the official code's int(d * p): rounds down
    if k < 1:
        fail(OP, f"p={p} keeps k = int({n} * {p}) = 0 of the {n} features for the RMS; "
                 f"need p >= {1 / n:.6g} on this axis")
    return axes, k


def _first_k_mask(x: Any, axes: tuple[int, ...], k: int) -> Any:
    """1.0 on the first k positions of the (single) normalized axis, 0.0 after; broadcasts to x."""
    xp = namespace(x)
    axis = axes[0]
    d = int(x.shape[axis])
    mask = xp.astype(xp.arange(d, device=device(x)) < k, xp.float64)
    shape = [1] * x.ndim
    shape[axis] = d
    return xp.reshape(mask, tuple(shape))


def _mean_square(x: Any, axes: tuple[int, ...], k: int) -> Any:
    """mean of x^2 over the first k values of the row (all of them when k = n); keepdims."""
    xp = namespace(x)
    squares = x * x
    if k != reduction_size(x, axes):
        squares = squares * _first_k_mask(x, axes, k)  # exact zeros: the sum is unchanged
    return xp.sum(squares, axis=axes, keepdims=True) / k


def _gain(weight: Any, weight_offset: float, ndim: int, axes: tuple[int, ...]) -> Any:
    """``weight_offset + weight`` shaped to broadcast against x, or None without a weight."""
    if weight is None:
        return None
    return weight_offset + expand_to(weight, ndim, axes)


def _normalize(x: Any, axes: tuple[int, ...], k: int, eps: float, eps_placement: str):
    """``(x_hat, inv_r, rms)``: x_hat = x * inv_r, with rms the eps-free RMS (outside only)."""
    xp = namespace(x)
    ms = _mean_square(x, axes, k)
    if eps_placement == "inside":
        inv_r = 1.0 / xp.sqrt(ms + eps)  # 1 / sqrt(mean(x^2) + eps)
        return x * inv_r, inv_r, None
    rms = xp.sqrt(ms)
    inv_r = 1.0 / (rms + eps)  # 1 / (RMS(x) + eps), rmsnorm_torch.py
    return x * inv_r, inv_r, rms


@oracle_function(OP)
def rms_norm(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    *,
    axes: tuple[int, ...] = (-1,),
    eps: float = 1e-8,
    eps_placement: str = "inside",
    weight_offset: float = 0.0,
    p: float = -1.0,
) -> Any:
    """RMS normalization of ``x`` over ``axes`` (pRMSNorm when ``p >= 0``); returns ``y``."""
    axes, k = _check(x, weight, bias, axes, p)
    x_hat, _, _ = _normalize(x, axes, k, eps, eps_placement)  # a / RMS(a), Eq. 4
    y = x_hat
    gain = _gain(weight, weight_offset, x.ndim, axes)
    if gain is not None:
        y = y * gain
    if bias is not None:
        y = y + expand_to(bias, x.ndim, axes)
    return y


@oracle_vjp(OP)
def rms_norm_vjp(
    dy: Any,
    x: Any,
    weight: Any = None,
    bias: Any = None,
    *,
    axes: tuple[int, ...] = (-1,),
    eps: float = 1e-8,
    eps_placement: str = "inside",
    weight_offset: float = 0.0,
    p: float = -1.0,
) -> dict[str, Any]:
    """Gradients of ``<dy, y>`` w.r.t. x, weight and bias (those given)."""
    xp = namespace(x)
    axes, k = _check(x, weight, bias, axes, p)
    check_shape(OP, "dy", dy, tuple(x.shape), "the cotangent of y has the shape of x")
    x_hat, inv_r, rms = _normalize(x, axes, k, eps, eps_placement)
    gain = _gain(weight, weight_offset, x.ndim, axes)
    h = dy if gain is None else dy * gain
    # (1/k) sum_i h_i x_hat_i over the whole row: every output depends on the statistic.
    coupling = xp.sum(h * x_hat, axis=axes, keepdims=True) / k
    if eps_placement == "inside":
        through_stat = x_hat  # d r/d a_j = a_j/(k r) = x_hat_j / k
    else:
        # d rho/d a_j = a_j/(k rho); 0 where rho = 0 (torch's subgradient of the norm at 0).
        safe = xp.where(rms > 0, rms, xp.ones_like(rms))
        through_stat = xp.where(rms > 0, x / safe, xp.zeros_like(x))
    if k == 1:
        # One element sets the statistic: its own factor 1 - x_hat * through_stat is eps/r^2
        # (inside) or eps/(rho + eps) (outside), formed directly, since the difference cancels
        # where |y| -> 1; the features after it pull on it through the statistic as before.
        own = eps * inv_r * inv_r if eps_placement == "inside" else eps * inv_r
        first = _first_k_mask(x, axes, k)
        rest = xp.sum(h * x_hat * (1.0 - first), axis=axes, keepdims=True)
        factor = first * own + (1.0 - first)
        grads = {"x": inv_r * (h * factor - through_stat * first * rest)}
    else:
        if k != reduction_size(x, axes):
            through_stat = through_stat * _first_k_mask(x, axes, k)  # only the first k set the RMS
        grads = {"x": inv_r * (h - through_stat * coupling)}
    shared = other_axes(x.ndim, axes)
    if weight is not None:
        grads["weight"] = sum_over(dy * x_hat, shared)
    if bias is not None:
        grads["bias"] = sum_over(dy, shared)
    return grads
