"""Batch-Channel Normalization (Qiao, Wang, Liu, Shen & Yuille, arXiv:1903.10520, "Micro-Batch
Training with Batch-Channel Normalization and Weight Standardization"; the BCN sections first
appeared as arXiv:1911.09738, "Rethinking Normalization and Elimination Singularity").

BCN is a batch normalization followed by a channel normalization (a GroupNorm without its own
per-channel affine) and an affine map, per channel c of group g (official README ``BCNorm``,
imagenet/models/layers.py ``GN``):

    z = BN_c(x) = gamma_b,c (x - mu_c) / sqrt(var_c + bn_eps) + beta_b,c      (batch step)
    y = gamma_g CN_g(z) + beta_g,  CN_g(z) = (z - mean_S z) / sqrt(var_S z + eps)  (channel step)

with S the (C/G channels, spatial) of one sample and group (GroupNorm's Eqs. 1-3, biased
variance, eps inside the root: the official code runs ``torch.batch_norm`` on the view
``(1, N*G, -1)`` in training mode, momentum 0) and gamma_g, beta_g of shape (G,) (the official
``Parameter(torch.ones(1, num_groups, 1))``; ``affine="per_channel"`` gives (C,) parameters, the
torch.nn.GroupNorm form).  The batch step's gamma_b, beta_b are nn.BatchNorm2d's own affine.

Which statistics the batch step uses (``bn_statistics``):

* ``batch``: nn.BatchNorm2d (the ImageNet code's ``GN`` class, README ``BCNorm(estimate=False)``):
  batch statistics in training, the running estimates updated torch's way (new_weight momentum,
  Bessel-corrected variance, num_batches_tracked + 1); running estimates in evaluation.
* ``estimated`` (README ``EstBN``, the micro-batch form): in training, under ``torch.no_grad``,

      mu_B = mean_R x,                 v_B = mean_R (x - mu_hat_old)^2   (around the OLD estimate)
      mu_hat = (1 - r) mu_hat_old + r mu_B,   var_hat = (1 - r) var_hat_old + r v_B

  (r the moving speed, ``momentum`` here; the official buffer ``estbn_moving_speed`` starts at 0
  and its schedule is set outside the released code), and then x is normalized with the *updated
  estimates*, ``(x - mu_hat) / sqrt(var_hat + 1e-5)``, in training as in evaluation.  The batch
  counter is never advanced (EstBN registers ``num_batches_tracked`` but does not touch it).

Backward.  The channel step's VJP is GroupNorm's (VJP-STD over S with h = dy * gamma, gamma per
group here); the batch step's is BatchNorm's: VJP-STD over R with batch statistics, or
``dx = dz gamma_b / sqrt(var + bn_eps)`` with constant statistics.  The estimated statistics are
computed under ``torch.no_grad`` in the official code, so no gradient flows through mu_hat and
var_hat although they depend on x: the backward is BatchNorm's constant-statistics VJP at the
updated estimates, which is the exact gradient of the forward only when r = 0 or in evaluation
(``backward = "custom"``; tests/test_batch_channel_norm.py checks it against finite differences of
the forward with the estimates frozen, and against the exact gradient where the two agree).

Accuracy.  With constant statistics on data far from them (mean 1e8, std 1e-3, estimates near
1e7), z = gamma_b (x - mu_hat) / s + beta_b has a spread of 1e-11 on values of ~3; the rounding
of each z (u |z|) would then be 1e-5 of the spread that the channel step rescales to O(1).  So z
is formed as ``a_c d + (k_c - mean_g k)``, with d = x - mean_R x (the accurate centered data of
:func:`_stats.centered_moments`), a_c = gamma_b,c / s_c and k_c = a_c (mean_R x - mu_c) + beta_b,c:
the same z up to a constant per group (the k's mean over the group's channels), which the channel
step removes exactly, and with no O(|z|) rounding where the group's k's agree.
"""

from __future__ import annotations

from typing import Any

from reference._backend import namespace
from reference._common import check_channel_params, check_shape, fail
from reference.normalizers import batch_norm as _bn
from reference.normalizers import group_norm as _gn
from reference.normalizers._stats import (
    centered_moments,
    expand_to,
    other_axes,
    reduction_size,
    running_average,
)
from reference.registry import oracle_function, oracle_vjp

OP = "batch_channel_norm"


def _raw(fn: Any) -> Any:
    """The undecorated oracle function: it computes in the dtype of its arguments."""
    return getattr(fn, "__wrapped__", fn)


def _check(x: Any, bn_weight: Any, bn_bias: Any, weight: Any, bias: Any, running_mean: Any,
           running_var: Any, num_groups: int, axis: int, affine: str) -> int:
    axis = check_channel_params(OP, x, axis, {"bn_weight": bn_weight, "bn_bias": bn_bias,
                                              "running_mean": running_mean, "running_var": running_var},
                                min_ndim=2, not_batch=True)
    channels = int(x.shape[axis])
    if channels % num_groups:
        fail(OP, f"num_groups={num_groups} must divide the {channels} channels of x on axis {axis} "
                 f"(shape {tuple(x.shape)})")
    expected = (num_groups,) if affine == "per_group" else (channels,)
    why = (f"affine='per_group': num_groups={num_groups}" if affine == "per_group"
           else f"affine='per_channel': x has {channels} channels on axis {axis}")
    check_shape(OP, "weight", weight, expected, why)
    check_shape(OP, "bias", bias, expected, why)
    if running_mean is None or running_var is None:
        fail(OP, "needs running_mean and running_var (the batch step's estimates)")
    return axis


def _uses_batch_statistics(bn_statistics: str, training: bool) -> bool:
    return bn_statistics == "batch" and training


def _bn_hparams(training: bool, axis: int, bn_eps: float, momentum: float) -> dict[str, Any]:
    """batch_norm's hyper-parameters for nn.BatchNorm2d(C) with this op's eps and momentum."""
    return {"training": training, "track_running_stats": True, "axis": axis, "eps": bn_eps,
            "momentum": momentum, "momentum_convention": "new_weight", "running_var_correction": 1,
            "single_value": "raise"}


def estimate_update(x: Any, running_mean: Any, running_var: Any, momentum: float, axis: int
                    ) -> tuple[Any, Any]:
    """EstBN's training update of the estimates (module docstring): ``(mu_hat, var_hat)``.

    The variance is taken around the estimate *before* the update, biased (a plain mean of the
    squares), as the official code does; the estimates enter the normalization after it."""
    xp = namespace(x)
    R = other_axes(x.ndim, axis)
    mean, _, _ = centered_moments(x, R)
    around_old = x - expand_to(running_mean, x.ndim, axis)
    v_b = xp.mean(around_old * around_old, axis=R)
    return (running_average(running_mean, xp.reshape(mean, (-1,)), None, momentum, "new_weight"),
            running_average(running_var, v_b, None, momentum, "new_weight"))


def _statistics(x: Any, running_mean: Any, running_var: Any, num_batches_tracked: Any, *,
                bn_statistics: str, training: bool, axis: int, bn_eps: float, momentum: float
                ) -> tuple[Any, Any, dict[str, Any]]:
    """The constant statistics the batch step normalizes with (None, None on the batch-statistics
    path) and the new state."""
    xp = namespace(x)
    count = num_batches_tracked if num_batches_tracked is not None else xp.zeros_like(running_mean[0])
    state = {"running_mean": running_mean, "running_var": running_var, "num_batches_tracked": count}
    if _uses_batch_statistics(bn_statistics, training):
        _, state = _raw(_bn.batch_norm)(x, None, None, running_mean, running_var, count,
                                        **_bn_hparams(True, axis, bn_eps, momentum))
        return None, None, state
    if bn_statistics == "estimated" and training:
        mean, var = estimate_update(x, running_mean, running_var, momentum, axis)
        state = {**state, "running_mean": mean, "running_var": var}
    return state["running_mean"], state["running_var"], state


def _batch_step(x: Any, bn_weight: Any, bn_bias: Any, mean_used: Any, var_used: Any, *, num_groups: int,
                axis: int, bn_eps: float) -> Any:
    """z = BN(x), up to a constant per channel group (module docstring, "Accuracy")."""
    xp = namespace(x)
    R = other_axes(x.ndim, axis)
    mean, centered, var = centered_moments(x, R)
    gamma = 1.0 if bn_weight is None else expand_to(bn_weight, x.ndim, axis)
    beta = 0.0 if bn_bias is None else expand_to(bn_bias, x.ndim, axis)
    if mean_used is None:  # batch statistics: z = gamma (x - mean) / sqrt(var + eps) + beta
        scale = gamma / xp.sqrt(var + bn_eps)
        offset = beta + xp.zeros_like(mean)
    else:                  # constant statistics: x - mu = (x - mean) + (mean - mu)
        scale = gamma / xp.sqrt(expand_to(var_used, x.ndim, axis) + bn_eps)
        offset = scale * (mean - expand_to(mean_used, x.ndim, axis)) + beta
    # A constant per (sample, group) leaves the channel step unchanged: remove each group's mean
    # offset so that equal offsets cancel exactly instead of being rounded into every z.
    per_channel = xp.reshape(offset, (-1,))
    grouped = xp.reshape(per_channel, (num_groups, -1))
    centered_offset = xp.reshape(grouped - xp.mean(grouped, axis=1, keepdims=True), (-1,))
    return scale * centered + expand_to(centered_offset, x.ndim, axis)


def init_state(x: Any, *, axis: int = 1) -> dict[str, Any]:
    """Estimates mean 0, variance 1 and no batch seen (nn.BatchNorm2d's and EstBN's buffers)."""
    check_channel_params(OP, x, axis, {}, min_ndim=2, not_batch=True)
    return _bn.init_state(x, axis=axis)


@oracle_function(OP)
def batch_channel_norm(
    x: Any,
    bn_weight: Any = None,
    bn_bias: Any = None,
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: Any = None,
    *,
    bn_statistics: str = "estimated",
    training: bool = True,
    num_groups: int = 32,
    affine: str = "per_group",
    axis: int = 1,
    bn_eps: float = 1e-5,
    eps: float = 1e-5,
    momentum: float = 0.1,
) -> tuple[Any, dict[str, Any]]:
    """Batch-channel normalization; returns ``(y, new_state)`` (module docstring)."""
    axis = _check(x, bn_weight, bn_bias, weight, bias, running_mean, running_var, num_groups, axis, affine)
    if _uses_batch_statistics(bn_statistics, training) and reduction_size(x, other_axes(x.ndim, axis)) == 1:
        fail(OP, f"expected more than 1 value per channel when training with batch statistics, got x "
                 f"of shape {tuple(x.shape)} (nn.BatchNorm2d refuses it)")
    mean_used, var_used, state = _statistics(
        x, running_mean, running_var, num_batches_tracked, bn_statistics=bn_statistics, training=training,
        axis=axis, bn_eps=bn_eps, momentum=momentum)
    z = _batch_step(x, bn_weight, bn_bias, mean_used, var_used, num_groups=num_groups, axis=axis,
                    bn_eps=bn_eps)
    y = _raw(_gn.group_norm)(z, weight, bias, num_groups=num_groups, axis=axis, eps=eps, affine=affine)
    return y, state


@oracle_vjp(OP)
def batch_channel_norm_vjp(
    dy: Any,
    x: Any,
    bn_weight: Any = None,
    bn_bias: Any = None,
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: Any = None,
    *,
    bn_statistics: str = "estimated",
    training: bool = True,
    num_groups: int = 32,
    affine: str = "per_group",
    axis: int = 1,
    bn_eps: float = 1e-5,
    eps: float = 1e-5,
    momentum: float = 0.1,
) -> dict[str, Any]:
    """Gradients of ``<dy, y>`` w.r.t. x and the four affine parameters (those given): GroupNorm's
    VJP for the channel step, then BatchNorm's (batch statistics, or the constant statistics the
    forward used, with no gradient through the estimates)."""
    axis = _check(x, bn_weight, bn_bias, weight, bias, running_mean, running_var, num_groups, axis, affine)
    check_shape(OP, "dy", dy, tuple(x.shape), "the cotangent of y has the shape of x")
    batch = _uses_batch_statistics(bn_statistics, training)
    if batch and reduction_size(x, other_axes(x.ndim, axis)) == 1:
        fail(OP, "expected more than 1 value per channel when training with batch statistics")
    mean_used, var_used, _ = _statistics(
        x, running_mean, running_var, num_batches_tracked, bn_statistics=bn_statistics, training=training,
        axis=axis, bn_eps=bn_eps, momentum=momentum)
    z = _batch_step(x, bn_weight, bn_bias, mean_used, var_used, num_groups=num_groups, axis=axis,
                    bn_eps=bn_eps)
    # GroupNorm's Jacobian is invariant to a constant per (sample, group): z up to it will do.
    g_channel = _raw(_gn.group_norm_vjp)(dy, z, weight, bias, num_groups=num_groups, axis=axis, eps=eps,
                                         affine=affine)
    g_batch = _raw(_bn.batch_norm_vjp)(g_channel["x"], x, bn_weight, bn_bias, mean_used, var_used, None,
                                       **_bn_hparams(batch, axis, bn_eps, momentum))
    grads = {"x": g_batch["x"]}
    if bn_weight is not None:
        grads["bn_weight"] = g_batch["weight"]
    if bn_bias is not None:
        grads["bn_bias"] = g_batch["bias"]
    grads.update({k: v for k, v in g_channel.items() if k != "x"})
    return grads
