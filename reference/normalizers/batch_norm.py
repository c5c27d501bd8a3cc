"""Batch Normalization (Ioffe & Szegedy, 2015, arXiv:1502.03167).

Training (Alg. 1): per channel c, over R = every axis but the channel axis (n = |R| values),

    mu_c = mean_R x,   var_c = mean_R (x - mu_c)^2            (biased, Alg. 1 lines 1-2)
    x_hat = (x - mu_c) / sqrt(var_c + eps)                     (Alg. 1 line 3)
    y = gamma_c * x_hat + beta_c                               (Alg. 1 line 4)

Inference (Alg. 2, step 10/11): the running estimates replace the batch statistics, so
``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``, an affine map.

Running statistics.  The paper averages the batch means and Bessel-corrected batch variances
(Alg. 2, "Var[x] <- m/(m-1) E_B[sigma_B^2]"); frameworks keep an exponential moving average
instead, and disagree on its form (dialects.md §1a):

* ``momentum_convention="new_weight"`` (PyTorch): ``new = (1 - m) * old + m * batch``
* ``momentum_convention="old_weight"`` (Flax, Keras, ONNX): ``new = m * old + (1 - m) * batch``
* ``momentum=None`` (PyTorch): a cumulative average, weight ``1 / num_batches_tracked`` for the new
  batch (which is the paper's population average).
* ``running_var_correction``: 1 stores the unbiased ``n/(n-1) var`` (PyTorch, TF fused, the
  paper), 0 stores the biased var (Flax, Keras 3, ONNX).
* ``single_value``: with n = 1 value per channel in training, ``"raise"`` refuses like PyTorch
  (``Expected more than 1 value per channel``); ``"allow"`` computes var = 0 (so y = beta) and,
  like TF's CPU kernel, uses ``n / max(n - 1, 1)`` so the running var stays finite.

Backward (training, or no running statistics): VJP-STD over R with ``h = dy * gamma``;
``dgamma = sum_R dy * x_hat``, ``dbeta = sum_R dy``.  Inference with running statistics:
``dx = dy * gamma / sqrt(running_var + eps)`` (no terms through the statistics).
"""

from __future__ import annotations

from typing import Any

from reference._backend import device, namespace
from reference._common import (
    check_channel_params,
    check_shape,
    fail,
)
from reference.normalizers._stats import (
    affine,
    expand_to,
    other_axes,
    reduction_size,
    running_average,
    running_standardize,
    running_state,
    standardize,
)
from reference.registry import oracle_function, oracle_vjp

OP = "batch_norm"


def _check(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, axis: int) -> int:
    params = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    return check_channel_params(OP, x, axis, params, min_ndim=2)


def _uses_batch_stats(training: bool, track_running_stats: bool) -> bool:
    # PyTorch: ``bn_training = training or (running_mean is None and running_var is None)``.
    return training or not track_running_stats


def init_state(x: Any, *, axis: int = 1, track_running_stats: bool = True) -> dict[str, Any]:
    """Running mean 0, running variance 1, no batches seen (every framework's initial state)."""
    if not track_running_stats:
        return {}
    xp = namespace(x)
    c = int(x.shape[_check(x, None, None, None, None, axis)])
    on = device(x)  # beside x: the state meets x's statistics in the update
    return {
        "running_mean": xp.zeros((c,), dtype=xp.float64, device=on),
        "running_var": xp.ones((c,), dtype=xp.float64, device=on),
        "num_batches_tracked": xp.asarray(0.0, dtype=xp.float64, device=on),
    }


@oracle_function(OP)
def batch_norm(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: Any = None,
    *,
    training: bool = True,
    track_running_stats: bool = True,
    axis: int = 1,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    momentum_convention: str = "new_weight",
    running_var_correction: int = 1,
    single_value: str = "raise",
) -> tuple[Any, dict[str, Any]]:
    """Batch normalization; returns ``(y, new_state)``.

    ``new_state`` holds the updated ``running_mean``, ``running_var``, ``num_batches_tracked``
    when ``track_running_stats`` (training updates them, inference returns them unchanged).
    """
    xp = namespace(x)
    axis = _check(x, weight, bias, running_mean, running_var, axis)
    R = other_axes(x.ndim, axis)
    n = reduction_size(x, R)
    state = (running_state(OP, x, running_mean, running_var, num_batches_tracked)
             if track_running_stats else {})

    if _uses_batch_stats(training, track_running_stats):
        if training and n == 1 and single_value == "raise":
            fail(OP, f"expected more than 1 value per channel when training, got x of shape "
                     f"{tuple(x.shape)} (set single_value='allow' for the Flax/Keras/TF behaviour)")
        x_hat, _, mean, var = standardize(x, R, eps)
        if training and track_running_stats:
            count = state["num_batches_tracked"] + 1.0
            bessel = n / max(n - running_var_correction, 1)
            state = {
                "running_mean": running_average(
                    running_mean, xp.reshape(mean, (-1,)), count, momentum, momentum_convention),
                "running_var": running_average(
                    running_var, xp.reshape(var, (-1,)) * bessel, count, momentum,
                    momentum_convention),
                "num_batches_tracked": count,
            }
    else:
        x_hat, inv_std = running_standardize(x, running_mean, running_var, eps, axis)

    return affine(x_hat, weight, bias, axis), state


@oracle_vjp(OP)
def batch_norm_vjp(
    dy: Any,
    x: Any,
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: Any = None,
    *,
    training: bool = True,
    track_running_stats: bool = True,
    axis: int = 1,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    momentum_convention: str = "new_weight",
    running_var_correction: int = 1,
    single_value: str = "raise",
) -> dict[str, Any]:
    """Gradients of ``<dy, y>`` w.r.t. x, weight and bias (those given)."""
    xp = namespace(x)
    axis = _check(x, weight, bias, running_mean, running_var, axis)
    check_shape(OP, "dy", dy, tuple(x.shape), "the cotangent of y has the shape of x")
    R = other_axes(x.ndim, axis)
    gamma = 1.0 if weight is None else expand_to(weight, x.ndim, axis)
    if _uses_batch_stats(training, track_running_stats):
        n = reduction_size(x, R)
        if training and n == 1 and single_value == "raise":
            fail(OP, "expected more than 1 value per channel when training")
        x_hat, inv_std, _, _ = standardize(x, R, eps)
        dbeta = xp.sum(dy, axis=R, keepdims=True)
        dgamma = xp.sum(dy * x_hat, axis=R, keepdims=True)
        # VJP-STD with h = gamma * dy.  gamma is constant over R, so mean_R(h) = gamma dbeta / n
        # and mean_R(h x_hat) = gamma dgamma / n: the paper's backward (Sec. 3) in one line.
        dx = (gamma * inv_std) * (dy - dbeta / n - x_hat * (dgamma / n))
    else:
        x_hat, inv_std = running_standardize(x, running_mean, running_var, eps, axis)
        dx = dy * (gamma * inv_std)
        dbeta = xp.sum(dy, axis=R, keepdims=True)
        dgamma = xp.sum(dy * x_hat, axis=R, keepdims=True)
    grads = {"x": dx}
    if weight is not None:
        grads["weight"] = xp.reshape(dgamma, (-1,))
    if bias is not None:
        grads["bias"] = xp.reshape(dbeta, (-1,))
    return grads
