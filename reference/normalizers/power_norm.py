"""Power Normalization (Shen, Yao, Gholami, Mahoney & Keutzer, 2020, arXiv:2003.07845).

PN is batch normalization for transformers with three changes (abstract, Sec. 4): no centering (a
per-channel *quadratic mean* replaces the variance), a *running* quadratic mean in the training
forward pass, and an *approximate backward pass* that carries a running statistic of its own.  The
official code (sIncerass/powernorm, ``fairseq/modules/norms/mask_powernorm.py``: ``MaskPowerNorm``,
``PowerFunction``, ``GroupScaling1D``) adds a warm-up on batch statistics and a per-token
pre-scaling.  Equation numbers below are this module's; "Alg." is the paper's algorithm box
"Power Normalization (every iteration)" (numbered Alg. 2 in the version quoted by the official
repository's issue #3).

Notation.  x has its C channels on ``axis``; R = every other axis (batch and positions), n = |R|;
``mean_R`` / ``sum_R`` reduce over R per channel; gamma, beta are the (C,) gain and shift; t is the
1-based training step (``iters + 1``: the official module increments its counter before the call);
phi is the running quadratic mean ``running_phi`` (initial 1), nu the backward statistic
``ema_gz`` (initial 0), W = ``warmup_iters``, a_f = ``alpha_fwd``, a_b = ``alpha_bkw``.

Optional pre-step, GroupScaling (``group_num = G``; the official layer always applies it, the
paper's algorithm box does not have it; the authors say it is described in the paper's appendix).
Per position, the C channels split into G contiguous groups of C/G, and

    x~ = x / sqrt(mean_group(x^2) + group_eps)                                             (0)

(the official ``GroupScaling1D``, eps 1e-5 whatever the layer's eps).  It is differentiated
exactly (autograd in the official code): per group, VJP-RMS, ``dx = (1/r)(h - x~ mean_group(h x~))``
with ``r = sqrt(mean_group(x^2) + group_eps)``.  Without ``group_num`` (None) x~ = x.  Below x
stands for x~.

Forward, training step t (Alg. forward; the warm-up from the official code):

    psi2_B = mean_R(x^2)                               batch quadratic mean, no centering  (1)
    s = psi2_B              if t <= W                  warm-up: batch statistics (PN-V)
      = phi_{t-1}           if t >  W                  running statistic of the last step  (2)
    z = x / sqrt(s + eps),   y = gamma z + beta                                            (3)

Running statistic (the forward state), default reading:

    phi_t = phi_{t-1} (t - 1)/t + psi2_B / t           t <= W: cumulative average          (4a)
    phi_t = a_f phi_{t-1} + (1 - a_f) psi2_B           t >  W: Alg.'s EMA                  (4b)

so phi_W is the mean of the W warm-up batch statistics and the first running-statistic step
divides by it.  W = 0 is the paper's algorithm box exactly: running statistics from step 1 (phi_0
= 1), EMA (4b) throughout.  Inference (Alg. "Inference"): ``y = gamma x / sqrt(phi + eps) + beta``,
state unchanged; its backward is the exact gradient ``dx = gamma dy / sqrt(phi + eps)`` (the
official eval path is plain autograd).

Backward, training step t (Alg. backward).  With h = gamma dy (``dL/dz``),

    Gamma_t = mean_R(z^2),   Lambda_t = mean_R(h z)                                        (5)

*Why an approximation.*  In the warm-up (s = psi2_B) the forward (3) is RMS normalization over
the batch, whose true gradient is VJP-RMS(R):

    dx_true = (h - z Lambda_t) / sqrt(psi2_B + eps)                                        (6)

(d psi2_B / d x_j = 2 x_j / n; contract d z_i / d x_j = delta_ij / sqrt(s + eps) - z_i z_j /
(n sqrt(s + eps)) with h).  After the warm-up the forward divides by phi_{t-1}, a constant of step
t, but phi_t depends on this batch through (4b) and every later step divides by it: the exact
gradient needs the future steps' Lambda.  The paper replaces the projection coefficient Lambda_t
of (6) by a running statistic nu of the past steps' gradients:

    X~' = h - nu_{t-1} z                               intermediate gradient               (7)
    dx  = X~' / sqrt(s + eps)                          the forward's divisor                (8)
    nu_t = nu_{t-1} (1 - (1 - a_b) Gamma_t) + (1 - a_b) Lambda_t
         = nu_{t-1} + (1 - a_b) mean_R(X~' z)                                              (9)

(9) moves nu toward the coefficient that makes the corrected gradient orthogonal to z per
channel: nu* = Lambda/Gamma is its fixed point, where ``sum_R dx z = 0``, the identity every
scale-invariant normalizer's gradient satisfies.  When Gamma_t = 1 (warm-up, eps -> 0) (9) is the
EMA ``nu_t = a_b nu_{t-1} + (1 - a_b) Lambda_t``.  nu is state written by the backward pass (the
spec's ``updated_in = "backward"``); the VJP returns ``(grads, {"ema_gz": nu_t})``.  Limits that
pin the declared backward down (tests/test_power_norm.py):

* nu_{t-1} = Lambda_t, the current batch's statistic, makes (7)-(8) the true gradient (6) in the
  warm-up: PN-V's exact backward, the BN-style backward without the mean term.
* nu = 0 after the warm-up makes (8) ``h / sqrt(phi_{t-1} + eps)``, the true gradient of the
  (then linear) forward; a_b = 1 freezes nu (9), so nu = 0 stays 0.
* ``dgamma = sum_R dy z`` and ``dbeta = sum_R dy`` are exact in every phase.

Official code (``official_code = True``; sIncerass/powernorm commit 9ea6226, read line by line).
It differs from the above in three places, reproduced together by the one knob:

(a) The backward statistic is stored scaled by 1/(1 - a_b): ``PowerFunction.backward`` computes
    ``X~' = h - (1 - a_b) ema_gz z`` and ``ema_gz += mean_R(X~' z)`` (no (1 - a_b) factor), i.e.
    ``ema_gz_t = ema_gz_{t-1} (1 - (1 - a_b) Gamma_t) + Lambda_t``.  With nu = (1 - a_b) ema_gz
    this is exactly (7) and (9): the same gradients, a different state (issue #3 of the official
    repository; the authors' answer calls (1 - a_b) an additional EMA factor).  At a_b = 1 the
    official correction vanishes while ema_gz keeps accumulating Lambda.
(b) dx divides by the *batch* statistic, ``dx = X~' / sqrt(psi2_B + eps)``, also after the
    warm-up, where the forward divided by phi_{t-1}.
(c) The warm-up update runs ``phi <- phi (t-1)/t + psi2_B/t`` only for t < W (the forward uses
    batch statistics for t <= W) and then, at every training step including the warm-up ones,
    ``phi <- a_f phi + (1 - a_f) psi2_B`` as well: the cumulative average is followed by the EMA.

Not modelled: the official ``pad_mask`` (psi2_B over the non-padded tokens only, the backward means
over all positions); the official module takes (T, B, C) or (B, C) with channels last, the
``axis = -1`` default here.

Accuracy: psi2_B, Gamma and the group statistic of (0) are sums of squares (no cancellation); |x|
must stay below about 1e154 / sqrt(n) for the squares to stay finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reference._backend import device, namespace
from reference._common import check_channel_params, check_shape, fail
from reference.normalizers._stats import affine, expand_to, other_axes, rms_vjp, sum_over
from reference.registry import oracle_function, oracle_vjp

OP = "power_norm"


# --------------------------------------------------------------------------------------------
# checks and the state
# --------------------------------------------------------------------------------------------


def _check(x: Any, weight: Any, bias: Any, running_phi: Any, ema_gz: Any, iters: Any, axis: int,
           group_num: int | None) -> int:
    """Validate shapes and the step count; return the normalized channel axis."""
    params = {"weight": weight, "bias": bias, "running_phi": running_phi, "ema_gz": ema_gz}
    axis = check_channel_params(OP, x, axis, params, min_ndim=2)
    c = int(x.shape[axis])
    if group_num is not None and c % group_num != 0:
        fail(OP, f"group_num={group_num} must divide the {c} channels on axis {axis} "
                 f"(x has shape {tuple(x.shape)})")
    if iters is not None:
        check_shape(OP, "iters", iters, (), "the step count is a scalar")
        count = float(iters)
        if not (count >= 0 and count == int(count)):
            fail(OP, f"iters must be a non-negative whole number of steps, got {count!r}")
    return axis


def init_state(x: Any, *, axis: int = -1) -> dict[str, Any]:
    """running_phi = 1, ema_gz = 0, no step taken (the official module's buffers)."""
    xp = namespace(x)
    c = int(x.shape[check_channel_params(OP, x, axis, {}, min_ndim=2)])
    on = device(x)
    return {
        "running_phi": xp.ones((c,), dtype=xp.float64, device=on),
        "ema_gz": xp.zeros((c,), dtype=xp.float64, device=on),
        "iters": xp.asarray(0.0, dtype=xp.float64, device=on),
    }


def _state(x: Any, running_phi: Any, ema_gz: Any, iters: Any, axis: int) -> tuple[Any, Any, Any]:
    """The given state, each missing slot at its initial value (the human API's convenience)."""
    if running_phi is not None and ema_gz is not None and iters is not None:
        return running_phi, ema_gz, iters
    xp = namespace(x)
    c = int(x.shape[axis])
    on = device(x)
    return (running_phi if running_phi is not None else xp.ones((c,), dtype=x.dtype, device=on),
            ema_gz if ema_gz is not None else xp.zeros((c,), dtype=x.dtype, device=on),
            iters if iters is not None else xp.asarray(0.0, dtype=x.dtype, device=on))


# --------------------------------------------------------------------------------------------
# GroupScaling, Eq. (0)
# --------------------------------------------------------------------------------------------


def _grouped_shape(x: Any, axis: int, groups: int) -> tuple[int, ...]:
    """x's shape with the channel axis split into (groups, C/groups), contiguous channels."""
    shape = tuple(int(s) for s in x.shape)
    return shape[:axis] + (groups, shape[axis] // groups) + shape[axis + 1:]


@dataclass
class _Scaled:
    """Eq. (0) on the grouped view: ``u_t = u * inv_r``, reduced over ``group_axis``."""

    u_t: Any
    inv_r: Any
    group_axis: int


def _group_scale(x: Any, axis: int, groups: int, group_eps: float) -> tuple[Any, _Scaled]:
    xp = namespace(x)
    u = xp.reshape(x, _grouped_shape(x, axis, groups))
    inv_r = 1.0 / xp.sqrt(xp.mean(u * u, axis=axis + 1, keepdims=True) + group_eps)
    u_t = u * inv_r
    return xp.reshape(u_t, tuple(x.shape)), _Scaled(u_t, inv_r, axis + 1)


def _group_scale_vjp(d: Any, scaled: _Scaled) -> Any:
    """VJP-RMS over each group: ``(1/r)(h - x~ mean_group(h x~))`` on the grouped view."""
    xp = namespace(d)
    h = xp.reshape(d, tuple(scaled.u_t.shape))
    du = rms_vjp(h, scaled.u_t, scaled.inv_r, (scaled.group_axis,))
    return xp.reshape(du, tuple(d.shape))


# --------------------------------------------------------------------------------------------
# the forward pass, shared by the function and the VJP
# --------------------------------------------------------------------------------------------


@dataclass
class _Pass:
    z: Any               # Eq. (3) before the affine map
    inv_s: Any           # 1 / sqrt(s + eps), the forward's divisor (Eq. 2)
    psi2: Any            # Eq. (1), keepdims (None in inference)
    t: float             # the training step t = iters + 1 (iters in inference)
    scaled: _Scaled | None


def _forward(x: Any, running_phi: Any, iters: Any, *, training: bool, axis: int, eps: float,
             warmup_iters: int, group_num: int | None, group_eps: float) -> _Pass:
    xp = namespace(x)
    scaled = None
    if group_num is not None:
        x, scaled = _group_scale(x, axis, group_num, group_eps)
    phi = expand_to(running_phi, x.ndim, axis)
    if not training:
        inv_s = 1.0 / xp.sqrt(phi + eps)
        return _Pass(x * inv_s, inv_s, None, float(iters), scaled)
    psi2 = xp.mean(x * x, axis=other_axes(x.ndim, axis), keepdims=True)       # Eq. (1)
    t = float(iters) + 1.0
    s = psi2 if t <= warmup_iters else phi                                      # Eq. (2)
    inv_s = 1.0 / xp.sqrt(s + eps)
    return _Pass(x * inv_s, inv_s, psi2, t, scaled)                             # Eq. (3)


def _running_phi(running_phi: Any, psi2: Any, t: float, *, alpha_fwd: float, warmup_iters: int,
                 official_code: bool) -> Any:
    """Eq. (4a)/(4b), or the official sequence (c)."""
    if official_code:
        phi = running_phi
        if t < warmup_iters:
            phi = phi * (t - 1.0) / t + psi2 / t
        return alpha_fwd * phi + (1.0 - alpha_fwd) * psi2
    if t <= warmup_iters:
        return running_phi * (t - 1.0) / t + psi2 / t                           # Eq. (4a)
    return alpha_fwd * running_phi + (1.0 - alpha_fwd) * psi2                   # Eq. (4b)


# --------------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------------


@oracle_function(OP)
def power_norm(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    running_phi: Any = None,
    ema_gz: Any = None,
    iters: Any = None,
    *,
    training: bool = True,
    axis: int = -1,
    eps: float = 1e-5,
    alpha_fwd: float = 0.9,
    alpha_bkw: float = 0.9,
    warmup_iters: int = 10000,
    group_num: int | None = None,
    group_eps: float = 1e-5,
    official_code: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Power normalization; returns ``(y, new_state)``.

    Training updates ``running_phi`` (Eq. 4) and ``iters``; ``ema_gz`` is returned as given (the
    backward pass updates it: :func:`power_norm_vjp`).  Inference leaves the state unchanged.
    A missing state slot starts at its initial value.
    """
    axis = _check(x, weight, bias, running_phi, ema_gz, iters, axis, group_num)
    running_phi, ema_gz, iters = _state(x, running_phi, ema_gz, iters, axis)
    p = _forward(x, running_phi, iters, training=training, axis=axis, eps=eps,
                 warmup_iters=warmup_iters, group_num=group_num, group_eps=group_eps)
    state = {"running_phi": running_phi, "ema_gz": ema_gz, "iters": iters}
    if training:
        xp = namespace(x)
        new_phi = _running_phi(expand_to(running_phi, x.ndim, axis), p.psi2, p.t,
                               alpha_fwd=alpha_fwd, warmup_iters=warmup_iters,
                               official_code=official_code)
        state = {"running_phi": xp.reshape(new_phi, (-1,)), "ema_gz": ema_gz,
                 "iters": iters + 1.0}
    return affine(p.z, weight, bias, axis), state


@oracle_vjp(OP)
def power_norm_vjp(
    dy: Any,
    x: Any,
    weight: Any = None,
    bias: Any = None,
    running_phi: Any = None,
    ema_gz: Any = None,
    iters: Any = None,
    *,
    training: bool = True,
    axis: int = -1,
    eps: float = 1e-5,
    alpha_fwd: float = 0.9,
    alpha_bkw: float = 0.9,
    warmup_iters: int = 10000,
    group_num: int | None = None,
    group_eps: float = 1e-5,
    official_code: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The declared backward of the step ``power_norm`` takes from this state: the gradients of
    ``<dy, y>`` w.r.t. x, weight and bias (those given; x's by Eq. 7-8, not the true gradient,
    in training) and the updated ``ema_gz`` (Eq. 9), as ``(grads, {"ema_gz": ...})``."""
    xp = namespace(x)
    axis = _check(x, weight, bias, running_phi, ema_gz, iters, axis, group_num)
    check_shape(OP, "dy", dy, tuple(x.shape), "the cotangent of y has the shape of x")
    running_phi, ema_gz, iters = _state(x, running_phi, ema_gz, iters, axis)
    p = _forward(x, running_phi, iters, training=training, axis=axis, eps=eps,
                 warmup_iters=warmup_iters, group_num=group_num, group_eps=group_eps)
    R = other_axes(x.ndim, axis)
    h = dy if weight is None else dy * expand_to(weight, x.ndim, axis)
    new_nu = ema_gz
    if not training:
        dz = h * p.inv_s                         # the eval map is linear in x: exact
    else:
        nu = expand_to(ema_gz, x.ndim, axis)
        if official_code:
            corrected = h - (1.0 - alpha_bkw) * nu * p.z                         # (a)
            dz = corrected / xp.sqrt(p.psi2 + eps)                               # (b)
            updated = nu + xp.mean(corrected * p.z, axis=R, keepdims=True)       # (a)
        else:
            corrected = h - nu * p.z                                             # Eq. (7)
            dz = corrected * p.inv_s                                             # Eq. (8)
            updated = nu + (1.0 - alpha_bkw) * xp.mean(corrected * p.z, axis=R, keepdims=True)  # (9)
        new_nu = xp.reshape(updated, (-1,))
    dx = dz if p.scaled is None else _group_scale_vjp(dz, p.scaled)
    grads = {"x": dx}
    if weight is not None:
        grads["weight"] = sum_over(dy * p.z, R)
    if bias is not None:
        grads["bias"] = sum_over(dy, R)
    return grads, {"ema_gz": new_nu}
