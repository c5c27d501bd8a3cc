"""Instance Normalization (Ulyanov, Vedaldi & Lempitsky, 2016, arXiv:1607.08022).

Each channel of each sample ("instance") is standardized over its spatial positions alone
(Eq. 2, for an image tensor x_tijk: t the sample, i the channel, j, k the spatial indices):

    mu_ti = 1/(HW) sum_{l,m} x_tilm,     sigma^2_ti = 1/(HW) sum_{l,m} (x_tilm - mu_ti)^2
    y_tijk = (x_tijk - mu_ti) / sqrt(sigma^2_ti + eps)                        (Eq. 2)

with the biased variance and R = the spatial axes (n = |R| values per instance).  An optional
per-channel affine ``gamma_i * y + beta_i`` follows (torch ``affine=True``, Flax, Keras, ONNX).
Unlike BatchNorm, the paper uses instance statistics at test time too.

Running statistics (PyTorch ``track_running_stats=True`` only).  torch's ``instance_norm``
(aten/native/Normalization.cpp) reshapes x to (1, N*C, *), runs batch_norm over it with the
running stats repeated N times, then stores the mean over N of the N per-instance running
stats.  Written out, per channel c and one training step:

    batch_mean_c = mean_n mu_nc,     batch_var_c = mean_n [n/(n - correction) sigma^2_nc]
    running = running_average(running, batch, ...)   (the BatchNorm recurrence, see _stats)

i.e. the Bessel factor uses the *spatial* count n, not N*n.  In inference with tracked stats the
running estimates replace the instance statistics and the op is an affine map, exactly BatchNorm
inference (pytorch#58843).  The knobs are BatchNorm's: ``momentum`` (None = cumulative average),
``momentum_convention``, ``running_var_correction``, and ``single_value`` for one spatial element
per instance: ``"raise"`` like torch (which checks whenever instance statistics are used, eval
without running stats included) or ``"allow"`` (var = 0, y = beta, Bessel factor n/max(n-1, 1)).

Backward.  With instance statistics (training, or no running stats) the op is a standardizer over
R per (n, c), so VJP-STD(R) with ``h = dy * gamma_c``:
``dx = inv_std * (h - mean_R h - x_hat * mean_R(h * x_hat))`` (from d x_hat_i / d x_j =
inv_std (delta_ij - 1/n) - inv_std x_hat_i x_hat_j / n).  Inference with running stats:
``dx = h / sqrt(running_var + eps)``.  In both, ``dgamma_c = sum_{N,R} dy * x_hat`` and
``dbeta_c = sum_{N,R} dy``.
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
    standardize_vjp,
)
from reference.registry import oracle_function, oracle_vjp

OP = "instance_norm"


def _check(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, axis: int) -> int:
    params = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    return check_channel_params(OP, x, axis, params, min_ndim=3, not_batch=True)


def _uses_instance_stats(training: bool, track_running_stats: bool) -> bool:
    # torch: ``use_input_stats = self.training or not self.track_running_stats``.
    return training or not track_running_stats


def _spatial_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """R: every axis but the batch axis 0 and the channel axis."""
    return other_axes(ndim, (0, axis))


def init_state(x: Any, *, axis: int = 1, track_running_stats: bool = False) -> dict[str, Any]:
    """Running mean 0, running variance 1, no batches seen (torch's buffers); empty if untracked."""
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


def _refuse_single_value(x: Any, n: int, single_value: str) -> None:
    if n == 1 and single_value == "raise":
        fail(OP, f"expected more than 1 spatial element when training (or without running stats), "
                 f"got x of shape {tuple(x.shape)} (set single_value='allow' for var = 0, y = beta)")


@oracle_function(OP)
def instance_norm(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: Any = None,
    *,
    training: bool = True,
    track_running_stats: bool = False,
    axis: int = 1,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    momentum_convention: str = "new_weight",
    running_var_correction: int = 1,
    single_value: str = "raise",
) -> tuple[Any, dict[str, Any]]:
    """Instance normalization; returns ``(y, new_state)``.

    ``new_state`` is empty unless ``track_running_stats``; then it holds ``running_mean``,
    ``running_var`` and ``num_batches_tracked``, updated in training and unchanged in inference.
    """
    xp = namespace(x)
    axis = _check(x, weight, bias, running_mean, running_var, axis)
    R = _spatial_axes(x.ndim, axis)
    n = reduction_size(x, R)
    state = (running_state(OP, x, running_mean, running_var, num_batches_tracked)
             if track_running_stats else {})

    if _uses_instance_stats(training, track_running_stats):
        _refuse_single_value(x, n, single_value)
        x_hat, _, mu, var = standardize(x, R, eps)  # Eq. 2, one (mu, sigma^2) per (n, c)
        if training and track_running_stats:
            count = state["num_batches_tracked"] + 1.0
            bessel = n / max(n - running_var_correction, 1)
            # torch averages the N per-instance running stats: the mean over the batch axis of
            # the per-instance statistics, each carrying the spatial Bessel factor.
            batch_mean = xp.reshape(xp.mean(mu, axis=(0,) + R), (-1,))
            batch_var = xp.reshape(xp.mean(var * bessel, axis=(0,) + R), (-1,))
            state = {
                "running_mean": running_average(
                    running_mean, batch_mean, count, momentum, momentum_convention),
                "running_var": running_average(
                    running_var, batch_var, count, momentum, momentum_convention),
                "num_batches_tracked": count,
            }
    else:
        x_hat, inv_std = running_standardize(x, running_mean, running_var, eps, axis)

    return affine(x_hat, weight, bias, axis), state


@oracle_vjp(OP)
def instance_norm_vjp(
    dy: Any,
    x: Any,
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: Any = None,
    *,
    training: bool = True,
    track_running_stats: bool = False,
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
    R = _spatial_axes(x.ndim, axis)
    h = dy if weight is None else dy * expand_to(weight, x.ndim, axis)
    if _uses_instance_stats(training, track_running_stats):
        _refuse_single_value(x, reduction_size(x, R), single_value)
        x_hat, inv_std, _, _ = standardize(x, R, eps)
        dx = standardize_vjp(h, x_hat, inv_std, R)
    else:
        if running_mean is None or running_var is None:
            fail(OP, "track_running_stats=True needs running_mean and running_var")
        x_hat, inv_std = running_standardize(x, running_mean, running_var, eps, axis)
        dx = h * inv_std  # the running stats are constants: no terms through statistics
    grads = {"x": dx}
    channel_sum = other_axes(x.ndim, axis)  # (N, R)
    if weight is not None:
        grads["weight"] = xp.sum(dy * x_hat, axis=channel_sum)
    if bias is not None:
        grads["bias"] = xp.sum(dy, axis=channel_sum)
    return grads
