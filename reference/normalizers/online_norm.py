"""Online Normalization (Chiley, Sharapov, Kosson, Koster, Reece, Samaniego de la Fuente, Subbiah &
James, NeurIPS 2019, arXiv:1905.05894).

Online Normalization normalizes the sample dimension like BatchNorm, but without batches: the
samples form a *stream*, each one normalized with running estimates of the mean and variance of
the samples before it, and the backward pass replaces the gradient through those statistics by a
*control process* with state of its own.  A batch is processed as a stream, sample after sample in
batch order (the official NumPy reference, ``online-norm/numpy_on/online_norm_{1d,2d}.py``, and
the CPU and CUDA kernels, ``online-norm/pytorch/online_norm_pytorch/csrc``, loop over the batch).
Equation numbers are the paper's as the official C reference labels them
(``online-norm/c/online-norm.c``: 8a-8c forward, 11a-11b and 12a-12b backward).

Notation.  x has the samples on axis 0 (t = 1..N, the stream order) and C channels on ``axis``;
S = every other axis (spatial positions; empty for a fully connected layer), n = |S|.  Per
sample and channel, mu(x_t) and sigma^2(x_t) are the mean and biased variance over S (for n = 1
they are x_t and 0: "the case of one scalar output per feature").  The stream state per channel is
the running mean mu (``running_mean``, initial 0) and variance sigma^2 (``running_var``, initial 1)
of the forward pass, and the accumulated errors eps^(1) (``u``, initial 0) and eps^(y) (``v``,
initial 0) of the backward pass (the official buffers' names).  a_f = ``alpha_fwd``, a_b =
``alpha_bkw``, and <a, b> = mean over S of a b (a product for n = 1; the official kernels' means).

Forward, training, for t = 1..N with the statistics *before* sample t:

    y_t = (x_t - mu_{t-1}) / sqrt(sigma^2_{t-1} + eps)                                     (8a)
    mu_t = mu_{t-1} + (1 - a_f) (mu(x_t) - mu_{t-1})                                        (8b)
    sigma^2_t = a_f sigma^2_{t-1} + (1 - a_f) sigma^2(x_t)
                + a_f (1 - a_f) (mu(x_t) - mu_{t-1})^2                                      (8c)

(8b)-(8c) are the exponentially weighted mean and variance of the stream's values: with the
second moment s_t = a_f s_{t-1} + (1 - a_f) mean_S(x_t^2), s_0 = sigma^2_0 + mu_0^2, one has
sigma^2_t = s_t - mu_t^2 exactly (expand (8b) squared), but (8c) adds non-negative terms only and
never cancels.  eps is the official code's (the paper and the C reference divide by sigma); the
paper and the code agree on everything else.  Then the affine map and the error-compensation
mechanism (ECM, ``ecm``):

    z_t = gamma y_t + beta,      out_t = ECM(z_t)

* ``ecm="ls"``, layer scaling (the paper's layer; the official ``LayerScaling``): per sample,
  ``out = z / sqrt(mean_F(z^2) + ls_eps)`` over every feature F = all axes but 0 (channels and
  positions), which keeps estimation errors from compounding across layers;
* ``ecm="ac"``, activation clamping (the official modules' default since 2020-03-25, described in
  the authors' post "Error Compensation Mechanism in Online Normalization"):
  ``out = clip(z, -c, c)`` with c = ``clamp_value`` (5);
* ``ecm="none"``: the normalization primitive alone (the official ``Norm1d``/``Norm2d``).

Inference: ``y = (x - mu) / sqrt(sigma^2 + eps)`` with the stored statistics, the affine map and
the ECM, state unchanged.

Backward, training.  The true gradient of (8a) w.r.t. x_t runs through every later sample's
statistics; the paper drops those paths and instead keeps the gradient orthogonal to y and to 1
*on average* over the stream, as the exact gradient of a normalizer is (batch normalization's
gradient has zero projection onto x_hat and onto the constant).  With y'_t = dL/dy_t =
gamma ECM'(dL/dout_t) (``rms_vjp`` for layer scaling, zero where the clamp is active):

    x~'_t = y'_t - (1 - a_b) eps^(y)_{t-1} y_t                     remove the y projection  (11a)
    eps^(y)_t = eps^(y)_{t-1} + <x~'_t, y_t>                       accumulate its error     (11b)
    x'_t = x~'_t / sqrt(sigma^2_{t-1} + eps) - (1 - a_b) eps^(1)_{t-1}   remove the mean    (12a)
    eps^(1)_t = eps^(1)_{t-1} + <x'_t, 1>                                                   (12b)

x'_t is dL/dx_t.  (1 - a_b) eps is the running estimate of the projection coefficient, and the
errors feed back: the projections that leave the layer sum to the change of the accumulators,
``sum_t <x'_t, 1> = eps^(1)_N - eps^(1)_0`` and ``sum_t <x~'_t, y_t> = eps^(y)_N - eps^(y)_0``, so
a bounded accumulator means zero projection on average (the "unbiased" gradient).  Limits that
pin the declared backward down (tests/test_online_norm.py):

* eps^(y) = <y', y> / ((1 - a_b) <y, y>) is the fixed point of (11): there x~'_t is exactly
  orthogonal to y_t and eps^(y) stays; likewise eps^(1) = <x~'/sigma, 1> / (1 - a_b) for (12).
* Stationary limit: with the statistics frozen at the population's (a_f = 1, mu and sigma^2 the
  mean and variance over the samples and positions), the controls at their fixed point and
  a_b -> 1, x' is the true gradient of normalization with the population's statistics,
  ``(y' - mean(y') - y mean(y' y)) / sigma`` (batch normalization's VJP-STD, eps -> 0); the
  error is O(N (1 - a_b)).  One sample repeated with a_b < 1 converges to the same (its
  instance-normalization gradient).
* a_f = 1 and a_b = 1 freeze both processes: the forward is a fixed affine map (then the ECM) and
  ``x' = y' / sqrt(sigma^2 + eps)`` is its exact gradient; inference is exact too and leaves u, v
  alone.  ``dgamma = sum dz y`` and ``dbeta = sum dz`` (dz = ECM'(dL/dout)) are exact always.

u and v are state written by the backward pass (the spec's ``updated_in = "backward"``): the VJP
returns ``(grads, {"u": ..., "v": ...})``.

Differences among the official implementations, read at Cerebras/online-normalization fe08b9f:
the NumPy reference and the CPU/CUDA kernels divide (12a) by the forward's sqrt(sigma^2_{t-1} +
eps) (the saved ``scale``), as here; the C reference (a scalar sketch without eps) calls
``bprop`` after ``fprop`` of the same sample and so divides by the updated sigma_t.  The clamp's
VJP here follows the NumPy reference (zero where the output equals +-c, so also at |z| = c
exactly); torch's ``clamp`` passes the gradient at |z| = c.  The NumPy ``OnlineNorm1d/2d`` pass
``clamp_val=`` to ``ActivationClamp(clamp_value=5, **kwargs)``, so the NumPy modules always clamp
at 5 whatever ``clamp_val`` they are given (PyTorch passes it positionally).  The PyTorch
``LayerScaling`` can group channels (``group_size``); one group (the default) is modelled.
``Norm*dBatched`` (the deprecated batched form computing the same recurrences with convolutions)
is not modelled.

Accuracy.  sigma^2(x_t) is ``_stats.centered_moments``' accurate two-step variance, and mu(x_t)
is kept as the unrounded pair (shift, delta) so that mu(x_t) - mu_{t-1} in (8b)-(8c) is accurate
when the stream has converged to a large offset; (8c) adds non-negative terms only; x_t - mu_{t-1}
is one rounding.  The state carried from sample to sample is float64 (a batch is N single-sample
calls, bitwise: tested), so a stream whose mean has converged to a large offset inherits the
rounding of mu in y (|mu| u / spread: the conditioning of the problem, not of the algorithm).
The control (11) multiplies eps^(y) by 1 - (1 - a_b) <y_t, y_t> per sample: it contracts only
while (1 - a_b) <y, y> < 2 (always with the defaults unless <y, y> > 200); beyond, the accumulator
and every later gradient amplify rounding (and any error) exponentially.  (12) contracts by a_b
always.  Squares are not rescaled: |x - mu| below about 1e154.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reference._backend import device, namespace
from reference._common import check_channel_params, check_shape
from reference.normalizers._stats import (
    affine,
    centered_moments,
    expand_to,
    other_axes,
    rms_vjp,
    sum_over,
)
from reference.registry import oracle_function, oracle_vjp

OP = "online_norm"


# --------------------------------------------------------------------------------------------
# checks and the state
# --------------------------------------------------------------------------------------------


def _check(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, u: Any, v: Any,
           axis: int) -> int:
    """Shapes: x (N, ..., C, ...) with the stream on axis 0; every per-channel array (C,)."""
    params = {"weight": weight, "bias": bias, "running_mean": running_mean,
              "running_var": running_var, "u": u, "v": v}
    return check_channel_params(OP, x, axis, params, min_ndim=2, not_batch=True)


def init_state(x: Any, *, axis: int = 1) -> dict[str, Any]:
    """mu = 0, sigma^2 = 1, u = v = 0: the official buffers' initial values ("assume the initial
    input distribution is zero mean and unit variance", "no accumulated error")."""
    xp = namespace(x)
    c = int(x.shape[_check(x, None, None, None, None, None, None, axis)])
    return {
        "running_mean": xp.zeros((c,), dtype=xp.float64, device=device(x)),
        "running_var": xp.ones((c,), dtype=xp.float64, device=device(x)),
        "u": xp.zeros((c,), dtype=xp.float64, device=device(x)),
        "v": xp.zeros((c,), dtype=xp.float64, device=device(x)),
    }


def _state(x: Any, axis: int, running_mean: Any, running_var: Any, u: Any, v: Any
           ) -> tuple[Any, Any, Any, Any]:
    """The given state, each missing slot at its initial value (the human API's convenience)."""
    xp = namespace(x)
    c = (int(x.shape[axis]),)
    return (running_mean if running_mean is not None else xp.zeros(c, dtype=x.dtype, device=device(x)),
            running_var if running_var is not None else xp.ones(c, dtype=x.dtype, device=device(x)),
            u if u is not None else xp.zeros(c, dtype=x.dtype, device=device(x)),
            v if v is not None else xp.zeros(c, dtype=x.dtype, device=device(x)))


def _positions(ndim: int, axis: int) -> tuple[int, ...]:
    """S: every axis but the stream axis 0 and the channel axis."""
    return other_axes(ndim, (0, axis))


def _mean_over(a: Any, axes: tuple[int, ...]) -> Any:
    """<a, 1>: the mean over ``axes`` (keepdims); ``a`` itself when there are none (n = 1)."""
    return namespace(a).mean(a, axis=axes, keepdims=True) if axes else a


# --------------------------------------------------------------------------------------------
# the forward pass, shared by the function and the VJP
# --------------------------------------------------------------------------------------------


@dataclass
class _Pass:
    y: Any            # Eq. (8a), every sample
    scale: Any        # sqrt(sigma^2_{t-1} + eps), per sample and channel (keepdims)
    z: Any            # gamma y + beta
    out: Any          # ECM(z)
    inv_rms: Any      # layer scaling's 1/sqrt(mean_F z^2 + ls_eps) per sample (ecm="ls")
    mean: Any         # mu_N, sigma^2_N (training; the given statistics in inference), (C,)
    var: Any


def _sample_moments(x: Any, S: tuple[int, ...]) -> tuple[Any, Any, Any]:
    """mu(x_t) as an unrounded sum ``shift + delta`` and sigma^2(x_t), over the positions, for
    every sample at once (keepdims).  Keeping the two parts lets (8b)-(8c) form mu(x_t) - mu_{t-1}
    as ``(shift - mu_{t-1}) + delta``: when the stream's mean has converged to a large offset the
    difference is small, and a rounded mu(x_t) would carry u |mu| into it (1e-12 absolute at an
    offset of 1e4, a relative 1e-10 of a difference of 1e-2)."""
    xp = namespace(x)
    if not S:  # one value per feature: mu(x_t) = x_t, sigma(x_t) = 0
        return x, xp.zeros_like(x), xp.zeros_like(x)
    shift = xp.mean(x, axis=S, keepdims=True)
    delta, _, var = centered_moments(x - shift, S)   # x - shift: exact for offset data (Sterbenz)
    return shift, delta, var


def _stream(x: Any, mean0: Any, var0: Any, axis: int, alpha_fwd: float) -> tuple[Any, Any, Any, Any]:
    """Eq. (8b)-(8c) sample after sample: the statistics each sample is normalized with (those
    before it, stacked along axis 0) and the final ones."""
    xp = namespace(x)
    shift, delta, var_x = _sample_moments(x, _positions(x.ndim, axis))
    m, s2 = expand_to(mean0, x.ndim, axis), expand_to(var0, x.ndim, axis)
    centers, variances = [], []
    for t in range(int(x.shape[0])):
        centers.append(m)
        variances.append(s2)
        d = (shift[t:t + 1, ...] - m) + delta[t:t + 1, ...]      # mu(x_t) - mu_{t-1}
        s2 = (alpha_fwd * s2 + (1.0 - alpha_fwd) * var_x[t:t + 1, ...]
              + alpha_fwd * (1.0 - alpha_fwd) * (d * d))             # (8c)
        m = m + (1.0 - alpha_fwd) * d                               # (8b)
    return xp.concat(centers, axis=0), xp.concat(variances, axis=0), m, s2


def _ecm(z: Any, ecm: str, ls_eps: float, clamp_value: float) -> tuple[Any, Any]:
    """The error-compensation mechanism's output, and layer scaling's 1/rms (else None)."""
    xp = namespace(z)
    if ecm == "ls":
        inv_rms = 1.0 / xp.sqrt(xp.mean(z * z, axis=other_axes(z.ndim, 0), keepdims=True) + ls_eps)
        return z * inv_rms, inv_rms
    if ecm == "ac":
        c = xp.full_like(z, clamp_value)
        return xp.where(z > c, c, xp.where(z < -c, -c, z)), None
    return z, None


def _ecm_vjp(g: Any, p: _Pass, ecm: str, clamp_value: float) -> Any:
    """dL/dz from dL/dout: VJP-RMS over the features (layer scaling), the clamp's mask, or g."""
    xp = namespace(g)
    if ecm == "ls":
        return rms_vjp(g, p.out, p.inv_rms, other_axes(g.ndim, 0))
    if ecm == "ac":  # the official NumPy VJP: zero where the output sits at +-c
        return xp.where(xp.abs(p.z) >= clamp_value, xp.zeros_like(g), g)
    return g


def _forward(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, *,
             training: bool, axis: int, eps: float, alpha_fwd: float, ecm: str, ls_eps: float,
             clamp_value: float) -> _Pass:
    xp = namespace(x)
    if training:
        center, variance, mean, var = _stream(x, running_mean, running_var, axis, alpha_fwd)
        mean, var = xp.reshape(mean, (-1,)), xp.reshape(var, (-1,))
    else:
        center, variance = expand_to(running_mean, x.ndim, axis), expand_to(running_var, x.ndim, axis)
        mean, var = running_mean, running_var
    scale = xp.sqrt(variance + eps)
    y = (x - center) / scale                                        # (8a)
    z = affine(y, weight, bias, axis)
    out, inv_rms = _ecm(z, ecm, ls_eps, clamp_value)
    return _Pass(y, scale, z, out, inv_rms, mean, var)


# --------------------------------------------------------------------------------------------
# the control process, Eq. (11)-(12)
# --------------------------------------------------------------------------------------------


def _control(yp: Any, p: _Pass, u0: Any, v0: Any, axis: int, alpha_bkw: float) -> tuple[Any, Any, Any]:
    """dL/dx of every sample, and the accumulators u = eps^(1), v = eps^(y) after the stream."""
    xp = namespace(yp)
    S = _positions(yp.ndim, axis)
    u, v = expand_to(u0, yp.ndim, axis), expand_to(v0, yp.ndim, axis)
    gain = 1.0 - alpha_bkw
    dx = []
    for t in range(int(yp.shape[0])):
        y_t = p.y[t:t + 1, ...]
        g = yp[t:t + 1, ...] - gain * v * y_t                       # (11a)
        v = v + _mean_over(g * y_t, S)                              # (11b)
        dx_t = g / p.scale[t:t + 1, ...] - gain * u                 # (12a)
        u = u + _mean_over(dx_t, S)                                 # (12b)
        dx.append(dx_t)
    return xp.concat(dx, axis=0), xp.reshape(u, (-1,)), xp.reshape(v, (-1,))


# --------------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------------


@oracle_function(OP)
def online_norm(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    u: Any = None,
    v: Any = None,
    *,
    training: bool = True,
    axis: int = 1,
    eps: float = 1e-5,
    alpha_fwd: float = 0.999,
    alpha_bkw: float = 0.99,
    ecm: str = "ls",
    ls_eps: float = 1e-5,
    clamp_value: float = 5.0,
) -> tuple[Any, dict[str, Any]]:
    """Online normalization of the stream of samples along axis 0; returns ``(out, new_state)``.

    Training normalizes each sample with the statistics of the samples before it and returns
    mu_N, sigma^2_N (Eq. 8); ``u`` and ``v`` come back as given (the backward pass updates them:
    :func:`online_norm_vjp`).  Inference uses the stored statistics and leaves the state alone.
    A missing state slot starts at its initial value.
    """
    axis = _check(x, weight, bias, running_mean, running_var, u, v, axis)
    running_mean, running_var, u, v = _state(x, axis, running_mean, running_var, u, v)
    p = _forward(x, weight, bias, running_mean, running_var, training=training, axis=axis, eps=eps,
                 alpha_fwd=alpha_fwd, ecm=ecm, ls_eps=ls_eps, clamp_value=clamp_value)
    return p.out, {"running_mean": p.mean, "running_var": p.var, "u": u, "v": v}


@oracle_vjp(OP)
def online_norm_vjp(
    dy: Any,
    x: Any,
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    u: Any = None,
    v: Any = None,
    *,
    training: bool = True,
    axis: int = 1,
    eps: float = 1e-5,
    alpha_fwd: float = 0.999,
    alpha_bkw: float = 0.99,
    ecm: str = "ls",
    ls_eps: float = 1e-5,
    clamp_value: float = 5.0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The declared backward of the call ``online_norm`` makes from this state: the gradients of
    ``<dy, out>`` w.r.t. x (Eq. 11-12 in training, not the true gradient; exact in inference),
    weight and bias (exact), and the updated accumulators, as ``(grads, {"u": ..., "v": ...})``."""
    axis = _check(x, weight, bias, running_mean, running_var, u, v, axis)
    check_shape(OP, "dy", dy, tuple(x.shape), "the cotangent of y has the shape of x")
    running_mean, running_var, u, v = _state(x, axis, running_mean, running_var, u, v)
    p = _forward(x, weight, bias, running_mean, running_var, training=training, axis=axis, eps=eps,
                 alpha_fwd=alpha_fwd, ecm=ecm, ls_eps=ls_eps, clamp_value=clamp_value)
    R = other_axes(x.ndim, axis)
    dz = _ecm_vjp(dy, p, ecm, clamp_value)
    yp = dz if weight is None else dz * expand_to(weight, x.ndim, axis)
    if training:
        dx, u, v = _control(yp, p, u, v, axis, alpha_bkw)
    else:
        dx = yp / p.scale                 # inference is an affine map of x: exact
    grads = {"x": dx}
    if weight is not None:
        grads["weight"] = sum_over(dz * p.y, R)
    if bias is not None:
        grads["bias"] = sum_over(dz, R)
    return grads, {"u": u, "v": v}
