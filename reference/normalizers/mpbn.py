"""Membrane Potential Batch Normalization (Guo, Zhang, Chen, Peng, Liu, Zhang, Huang & Ma, ICCV 2023,
arXiv:2308.08359): a BatchNorm on the membrane potential of a leaky integrate-and-fire (LIF) neuron,
between the potential's update and the firing function.

One time step t of the official LIF neuron (models/spike_layer.py ``mem_update``, called by
``LIFAct.forward`` once per step with ``decay = 0.25``, ``V_th = 1.0``):

    u_t     = tau m_{t-1} + x_t                          (charge; m_0 = 0, x_t the input current)
    u~_t    = MPBN(u_t) = gamma (u_t - mu) / sqrt(var + eps) + beta     (per channel)
    s_t     = H(u~_t / V_th - 1/2)                       (fire: ``torch.gt(mem2 / V_th, 0.5)``)
    m_t     = u_t (1 - s_t)                              (hard reset of the *un-normalized* potential)

so ``u_t = tau u_{t-1} (1 - s_{t-1}) + x_t`` with the reset folded into the carried potential m.
The neuron fires where the normalized potential exceeds V_th / 2 (strictly).  MPBN is one
``nn.BatchNorm2d(C)`` shared by all time steps and called once per step: in training every step
uses the batch statistics of its own u_t (over the batch and spatial axes) and updates the running
statistics, so a T-step forward updates them T times (torch's new_weight momentum 0.1, unbiased
variance); evaluation uses the running statistics.  The paper also describes an element-wise MPBN
(statistics per (C, H, W)); the official code has only the channel-wise form modelled here.

Re-parameterization for inference (the paper's training-inference decoupling): with the running
statistics, s = 1 iff ``gamma (u - mu) / sigma + beta > theta`` (theta = V_th / 2, sigma =
sqrt(var + eps)), i.e. per channel

    gamma > 0:  u > mu + (theta - beta) sigma / gamma        (the folded threshold V_th')
    gamma < 0:  u < mu + (theta - beta) sigma / gamma        (the inequality turns round)
    gamma = 0:  s = [beta > theta] whatever u is

(:func:`fold_threshold`, :func:`fire_folded`); the paper's ``V_th' = (V_th - beta) sigma / gamma +
mu`` is the first line in its notation, where the neuron fires at V_th itself.

The stream op ``mpbn`` is one time step: the input current x_t and the affine parameters in, the
carried potential m and the running statistics as state, the spikes and the normalized potential
u~_t (the quantity compared with the threshold) out.  The spike is a step function of u~_t:
forward only (``backward = "none"``, the stream contract); the official training differentiates
through it with a surrogate, :func:`spike_surrogate_grad`.

Surrogate gradient (``spike_activation`` with ``temp = 3``): the forward value is the step, the
backward is the derivative of ``(tanh(k (clamp(v, 0, 1) - 1/2)) + tanh(k/2)) / (2 tanh(k/2))`` at
v = u~ / V_th, i.e. ``k (1 - tanh^2(k (v - 1/2))) / (2 tanh(k/2)) / V_th`` for 0 <= v <= 1 (torch's
clamp passes the gradient on the closed interval) and 0 outside.
"""

from __future__ import annotations

import math
from typing import Any

from reference._backend import device, namespace
from reference._common import check_channel_params, check_shape, fail
from reference.normalizers import batch_norm as _bn
from reference.normalizers._stats import expand_to, other_axes, reduction_size
from reference.registry import oracle_function

OP = "mpbn"


def _raw(fn: Any) -> Any:
    """The undecorated oracle function: it computes in the dtype of its arguments."""
    return getattr(fn, "__wrapped__", fn)


def _bn_hparams(training: bool, axis: int, eps: float, momentum: float) -> dict[str, Any]:
    """batch_norm's hyper-parameters of the official ``nn.BatchNorm2d(channel)``."""
    return {"training": training, "track_running_stats": True, "axis": axis, "eps": eps,
            "momentum": momentum, "momentum_convention": "new_weight", "running_var_correction": 1,
            "single_value": "raise"}


def _check(x: Any, weight: Any, bias: Any, membrane: Any, running_mean: Any, running_var: Any,
           axis: int) -> int:
    axis = check_channel_params(OP, x, axis, {"weight": weight, "bias": bias, "running_mean": running_mean,
                                              "running_var": running_var}, min_ndim=2, not_batch=True)
    check_shape(OP, "membrane", membrane, tuple(x.shape), "the carried potential has the shape of x")
    if membrane is None or running_mean is None or running_var is None:
        fail(OP, "needs the state membrane, running_mean and running_var (init_state gives them)")
    return axis


def spikes_of(potential: Any, v_th: float) -> Any:
    """``H(u~ / V_th - 1/2)`` as 0.0 / 1.0 in potential's dtype (strict: no spike at equality)."""
    xp = namespace(potential)
    return xp.astype(potential / v_th > 0.5, potential.dtype)


def init_state(x: Any, *, axis: int = 1) -> dict[str, Any]:
    """The potential 0 (``torch.zeros_like(x[0])`` at the start of every sequence) and BatchNorm's
    initial running statistics."""
    check_channel_params(OP, x, axis, {}, min_ndim=2, not_batch=True)
    xp = namespace(x)
    return {"membrane": xp.zeros(tuple(x.shape), dtype=xp.float64, device=device(x)),
            **_bn.init_state(x, axis=axis)}


@oracle_function(OP)
def mpbn(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    membrane: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: Any = None,
    *,
    decay: float = 0.25,
    v_th: float = 1.0,
    training: bool = True,
    axis: int = 1,
    eps: float = 1e-5,
    momentum: float = 0.1,
) -> tuple[tuple[Any, Any], dict[str, Any]]:
    """One LIF time step with MPBN: ``((spikes, potential), new_state)`` (module docstring)."""
    axis = _check(x, weight, bias, membrane, running_mean, running_var, axis)
    if training and reduction_size(x, other_axes(x.ndim, axis)) == 1:
        fail(OP, f"expected more than 1 value per channel when training (the batch statistics of the "
                 f"potential), got x of shape {tuple(x.shape)} (nn.BatchNorm2d refuses it)")
    u = decay * membrane + x                                    # charge
    bn_hp = _bn_hparams(training, axis, eps, momentum)
    potential, bn_state = _raw(_bn.batch_norm)(u, weight, bias, running_mean, running_var,
                                               num_batches_tracked, **bn_hp)
    spikes = spikes_of(potential, v_th)                         # fire
    return (spikes, potential), {"membrane": u * (1.0 - spikes), **bn_state}   # hard reset


# --------------------------------------------------------------------------------------------
# Inference re-parameterization: MPBN folded into a per-channel threshold
# --------------------------------------------------------------------------------------------


def fold_threshold(weight: Any, bias: Any, running_mean: Any, running_var: Any, *, eps: float = 1e-5,
                   v_th: float = 1.0) -> dict[str, Any]:
    """The per-channel firing rule on the raw potential u that replaces MPBN in inference.

    Returns ``threshold`` (V_th' = mu + (theta - beta) sigma / gamma, theta = V_th / 2; 0 where
    gamma = 0), ``sign`` (sign(gamma): +1 fires above V_th', -1 below, 0 never looks at u) and
    ``constant`` (where gamma = 0: 1.0 if beta > theta, else 0.0)."""
    xp = namespace(running_mean)
    theta = 0.5 * v_th
    gamma = xp.ones_like(running_mean) if weight is None else weight
    beta = xp.zeros_like(running_mean) if bias is None else bias
    sigma = xp.sqrt(running_var + eps)
    flat = gamma == 0.0
    safe = xp.where(flat, xp.ones_like(gamma), gamma)
    threshold = xp.where(flat, xp.zeros_like(gamma), running_mean + (theta - beta) * sigma / safe)
    constant = xp.astype(flat & (beta > theta), running_mean.dtype)
    return {"threshold": threshold, "sign": xp.sign(gamma), "constant": constant}


def fire_folded(u: Any, folded: dict[str, Any], *, axis: int = 1) -> Any:
    """Spikes of the raw potential u under :func:`fold_threshold`'s rule (0.0 / 1.0)."""
    xp = namespace(u)
    threshold, sign, constant = (expand_to(folded[k], u.ndim, axis)
                                 for k in ("threshold", "sign", "constant"))
    above, below = u > threshold, u < threshold
    fired = xp.where(sign > 0, above, xp.where(sign < 0, below, constant > 0.5))
    return xp.astype(fired, u.dtype)


# --------------------------------------------------------------------------------------------
# The official surrogate gradient of the spike
# --------------------------------------------------------------------------------------------


def spike_surrogate_grad(potential: Any, *, v_th: float = 1.0, temp: float = 3.0) -> Any:
    """d s / d u~ as the official ``spike_activation`` backpropagates it (module docstring).

    The derivative of ``(tanh(k (clamp(v, 0, 1) - 1/2)) + tanh(k/2)) / (2 tanh(k/2))`` with
    v = u~ / V_th: ``k (1 - tanh^2(k (v - 1/2))) / (2 tanh(k/2) V_th)`` on 0 <= v <= 1, else 0."""
    xp = namespace(potential)
    v = potential / v_th
    inside = (v >= 0.0) & (v <= 1.0)
    t = xp.tanh(temp * (v - 0.5))
    slope = temp * (1.0 - t * t) / (2.0 * math.tanh(0.5 * temp) * v_th)
    return xp.where(inside, slope, xp.zeros_like(slope))
