"""Unified Normalization (Yang, Zhang et al., ACM Multimedia 2022, arXiv:2208.01313).

UN replaces LayerNorm in transformers by a normalization with *offline* statistics, so that at
inference it is a per-channel affine map that folds into the neighbouring linear layer.  Like
PowerNorm it normalizes each channel by a quadratic mean over the batch and the tokens (no
centering); it calibrates the statistic with a *window* of the last F iterations (a geometric
mean in the forward pass, an arithmetic mean of gradient statistics in the backward pass: the
paper's "tailored fluctuation smoothing"), skips a batch whose statistic is an outlier
("adaptive outlier filtration"), and scales the gradient by a clamped ratio of the statistic to
the running one ("gradient compensation", the official code's comment).  The official code
(hikvision-research/Unified-Normalization, ``unified_normalization.py``: ``UN1d`` and
``UN2dFunction``, identical in the image-classification and fairseq trees) is the reference read
here; the paper's text was not available, so the equation numbers below are this module's.

Notation.  x has its C channels on ``axis`` (the official module takes (B, N, C) or (N, C),
channels last: ``axis = -1``); R = every other axis, n = |R|; ``mean_R`` / ``sum_R`` reduce over R
per channel.  gamma, beta: the (C,) gain and shift.  t = ``iters + 1`` is the 1-based training
step (the official module increments its counter before the call).  F = ``fp_window``, F_b =
``bp_window`` (the official ``window_size``, an int for both or a pair), W = ``warmup_iters``,
m = ``momentum`` (the weight of the *old* value in every EMA), T_c = ``compensation_start``.
State: ``running_var`` v (initial 1), the forward window ``buffer_x2`` B (F x C, initial 0), the
backward window ``buffer_gz`` G (F_b x C, initial 0), ``ema_gz`` e (initial 0), ``iters``,
``skip_counter`` (the number of filtered steps).

Forward, training step t:

    q_t = mean_R(x^2)                              per-channel quadratic mean               (1)
    rho_t = Var(sqrt(B_{t-1}))                     unbiased, over all F x C entries, a scalar (2)
    B_t = B_{t-1} with row (t mod F) set to q_t    the forward window                       (3)

Outlier filtration (only with ``outlier_filtration`` and t >= W), with the arithmetic and the
geometric mean over the window, AM = mean_F(B_t) and GM = (prod_F B_t)^(1/F) per channel:

    skip_t = any_c (AM_c - GM_c > F rho_t);   if skip_t: row (t mod F) of B_t <- v_{t-1}    (4)

(AM >= GM always, with equality for a constant window; one batch statistic far from the others
opens the gap.  F = 1 makes every step a skipped step in the official code.  Where AM = GM and
rho = 0, e.g. F = 1 at step 1 with W <= 1 (a window of zeros: rho = 0), the official
``exp(mean(log B))`` decides by its rounding: it falls below q in about 4% of the channels; the
oracle computes AM = GM exactly there and does not filter.)  Then

    s_t = q_t                if t <= F or t < W or skip_t      the batch statistic
        = GM(B_t)            otherwise                         the window's geometric mean  (5)
    r_t = clip(sqrt(s_t + eps) / sqrt(v_{t-1} + eps), 1/r_max, r_max)
                             if t > max(T_c, W) and not skip_t, else 1                      (6)
    z = x / sqrt(s_t + eps),   y = gamma z + beta                                           (7)
    v_t = m v_{t-1} + (1 - m) s_t                                                           (8)

``skip_counter`` counts the steps (4) filtered (not the F = 1 steps, skipped without a test).
Inference: ``y = gamma x / sqrt(v + eps) + beta`` (9), state unchanged; its backward is the exact
gradient (the official eval path is plain autograd).  (9) is a per-channel affine map: it folds
into the next linear layer (the paper's point; tests/test_unified_norm.py).

Backward, training step t (the official ``UN2dFunction.backward``).  With h = gamma dy:

    g = r_t h,   Lambda_t = mean_R(g z)                                                    (10)
    G_t = G_{t-1} with row (t mod F_b) set to (e_{t-1} if skip_t else Lambda_t)            (11)
    mu_t = Lambda_t          if t <= F_b or t < W or skip_t
         = mean_{F_b}(G_t)   otherwise                                                      (12)
    e_t = m e_{t-1} + (1 - m) mu_t                                                          (13)
    dx = (g - c_t z) / sqrt(s_t + eps),   c_t = mu_t if skip_t else e_t                     (14)
    dgamma = sum_R(dy r_t z),   dbeta = sum_R(dy)                                           (15)

G and e are state written by the backward pass (the spec's ``updated_in = "backward"``): the VJP
returns ``(grads, {"buffer_gz": G_t, "ema_gz": e_t})``.  The forward's decisions (skip_t, the
phase of s_t, r_t) are recomputed from the state the forward saw, as the official code passes
them from its forward to its backward.

*Why the backward is not the gradient.*  When s_t = q_t (the batch-statistic phase) the forward
is RMS normalization over R, whose true gradient is VJP-RMS(R):
``dx_true = (h - z mean_R(h z)) / sqrt(q_t + eps)``.  (14) replaces the current coefficient
Lambda_t = mean_R(h z) by an EMA (13) of window means (12) of past coefficients, and multiplies h
by r_t.  Limits that pin the declared backward down (tests/test_unified_norm.py):

* a skipped step (F = 1, or a filtered batch) has r = 1 and c_t = mu_t = Lambda_t: (14) is the
  true gradient of the batch-statistic forward;
* m = 0 in the batch-statistic phase (not skipped) gives e_t = mu_t = Lambda_t: the true gradient
  again (the official code then uses e_t, which is the current statistic);
* ``dbeta`` is exact in every phase and ``dgamma`` exact while r = 1; afterwards it carries the
  compensation factor r_t of (15) (``grad_output * r * z`` in the official code);
* in the window phase the forward also depends on x through q_t in one of the F factors of GM,
  d s_t / d q_t = s_t / (F q_t); (14) ignores it.

Accuracy.  The quadratic means are sums of squares (no cancellation; |x| below about
1e154 / sqrt(n) keeps them finite).  The geometric mean is the official code's
``exp(mean(log B))``, which loses about |log B| ulps (600 ulps for statistics near 1e-300: the
logarithm's absolute error becomes the result's relative error).  Here it is rescaled by the
largest entry of each channel's window, S = max_F B: ``GM = S (prod_F (B / S))^(1/F)`` while the
product of the ratios in (0, 1] stays a normal number (a window spanning up to 308/F decades),
``S exp(mean_F(log(B / S)))`` beyond.  Both err by at most about 2 + 2 mean_F|ln(B/S)| ulps (the
rounding of 1/F in the exponent, or of the logarithms and their mean): 2 ulps for a steady
window or for F = 1, 2, 4, 8 (measured near 1e-300: <= 1.8 ulps for windows of up to 30 decades
with F = 2, 4, 19 ulps with F = 3, 7; the official form 500 to 1600 ulps on the same windows).
A zero entry gives GM = 0 (log 0 = -inf in the official code); an infinite S falls back to the
unscaled form (inf, or NaN with a zero beside it, as the official code).  AM - GM in (4) is a
difference of nearly equal numbers when the window is steady; the decision is a jump of the op
(spec ``discontinuities``, :func:`near_outlier_threshold`).

Not modelled: the official ``pad_mask`` (q_t over the non-padded tokens only; the backward means
over all positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from reference._backend import device, namespace
from reference._common import check_channel_params, check_shape, fail
from reference.normalizers._stats import affine, centered_moments, expand_to, other_axes, sum_over
from reference.registry import oracle_function, oracle_vjp

OP = "unified_norm"


# --------------------------------------------------------------------------------------------
# checks and the state
# --------------------------------------------------------------------------------------------


def _check(x: Any, weight: Any, bias: Any, running_var: Any, ema_gz: Any, buffer_x2: Any,
           buffer_gz: Any, iters: Any, skip_counter: Any, axis: int, fp_window: int,
           bp_window: int) -> int:
    """Validate shapes and the counters; return the normalized channel axis."""
    params = {"weight": weight, "bias": bias, "running_var": running_var, "ema_gz": ema_gz}
    axis = check_channel_params(OP, x, axis, params, min_ndim=2)
    c = int(x.shape[axis])
    check_shape(OP, "buffer_x2", buffer_x2, (fp_window, c),
                f"fp_window={fp_window} rows of the {c} channels on axis {axis}")
    check_shape(OP, "buffer_gz", buffer_gz, (bp_window, c),
                f"bp_window={bp_window} rows of the {c} channels on axis {axis}")
    for name, count in (("iters", iters), ("skip_counter", skip_counter)):
        if count is None:
            continue
        check_shape(OP, name, count, (), "a count is a scalar")
        value = float(count)
        if not (value >= 0 and value == int(value)):
            fail(OP, f"{name} must be a non-negative whole number, got {value!r}")
    return axis


def init_state(x: Any, *, axis: int = -1, fp_window: int = 4, bp_window: int = 4) -> dict[str, Any]:
    """The official module's buffers: running_var 1, ema_gz 0, both windows 0, no step taken."""
    xp = namespace(x)
    c = int(x.shape[check_channel_params(OP, x, axis, {}, min_ndim=2)])
    on = device(x)
    return {
        "running_var": xp.ones((c,), dtype=xp.float64, device=on),
        "ema_gz": xp.zeros((c,), dtype=xp.float64, device=on),
        "buffer_x2": xp.zeros((fp_window, c), dtype=xp.float64, device=on),
        "buffer_gz": xp.zeros((bp_window, c), dtype=xp.float64, device=on),
        "iters": xp.asarray(0.0, dtype=xp.float64, device=on),
        "skip_counter": xp.asarray(0.0, dtype=xp.float64, device=on),
    }


@dataclass
class _State:
    running_var: Any
    ema_gz: Any
    buffer_x2: Any
    buffer_gz: Any
    iters: Any
    skip_counter: Any


def _state(x: Any, axis: int, fp_window: int, bp_window: int, **given: Any) -> _State:
    """The given state, each missing slot at its initial value (the human API's convenience),
    in x's dtype (the same-precision baseline calls the raw functions on float32)."""
    xp = namespace(x)
    c, on, dt = int(x.shape[axis]), device(x), x.dtype
    initial = {
        "running_var": lambda: xp.ones((c,), dtype=dt, device=on),
        "ema_gz": lambda: xp.zeros((c,), dtype=dt, device=on),
        "buffer_x2": lambda: xp.zeros((fp_window, c), dtype=dt, device=on),
        "buffer_gz": lambda: xp.zeros((bp_window, c), dtype=dt, device=on),
        "iters": lambda: xp.asarray(0.0, dtype=dt, device=on),
        "skip_counter": lambda: xp.asarray(0.0, dtype=dt, device=on),
    }
    return _State(**{k: given[k] if given[k] is not None else make() for k, make in initial.items()})


def _with_row(buffer: Any, index: int, row: Any) -> Any:
    """``buffer`` with row ``index`` replaced by ``row`` (a new array: the oracle is pure)."""
    xp = namespace(buffer)
    row = xp.reshape(row, (1, int(buffer.shape[1])))
    return xp.concat([buffer[:index, ...], row, buffer[index + 1:, ...]], axis=0)


# --------------------------------------------------------------------------------------------
# window statistics, Eq. (2) and (4)
# --------------------------------------------------------------------------------------------


def geometric_mean(buffer: Any) -> Any:
    """``(prod_F B)^(1/F)`` per channel (over axis 0), rescaled by each channel's largest entry S
    (module docstring, "Accuracy"); 0 where an entry is 0."""
    xp = namespace(buffer)
    f = int(buffer.shape[0])
    top = xp.max(buffer, axis=0)
    finite_top = (top > 0) & (top < math.inf)
    scale = xp.where(finite_top, top, xp.ones_like(top))
    ratio = buffer / scale                                     # in (0, 1]: one rounding each
    # The product of the F ratios while it stays a normal number: F - 1 roundings, divided by F
    # in the root (and, for F not a power of 2, the rounding of 1/F, |ln P|/F ulps).  Otherwise
    # (a window spanning more than 308/F decades) the mean of the logarithms, 2 mean|ln(B/S)|
    # ulps, with log B - log S where B/S underflows.
    product = xp.prod(ratio, axis=0)
    by_product = scale * product ** (1.0 / f)
    tiny = xp.finfo(buffer.dtype).smallest_normal
    normal = ratio >= tiny  # a subnormal ratio has lost bits: take log B - log S there
    safe_ratio = xp.where(normal, ratio, xp.ones_like(ratio))
    safe_buffer = xp.where(buffer > 0, buffer, xp.ones_like(buffer))
    logs = xp.where(normal, xp.log(safe_ratio), xp.log(safe_buffer) - xp.log(scale))
    mean_log = xp.mean(logs, axis=0)
    # S exp(mean) unless exp(mean) alone underflows (S large): then exp(mean + log S) directly.
    shrink = xp.exp(mean_log)
    by_logs = xp.where(shrink >= tiny, scale * shrink, xp.exp(mean_log + xp.log(scale)))
    gm = xp.where(product >= tiny, by_product, by_logs)
    # A zero entry makes the product 0 (log 0 = -inf in the official code); a negative or NaN
    # entry makes it NaN (the official log is NaN there).
    zero = xp.any(buffer == 0, axis=0)
    gm = xp.where(zero, xp.zeros_like(gm), gm)
    invalid = xp.any((buffer < 0) | xp.isnan(buffer), axis=0)
    return xp.where(invalid, xp.full_like(gm, math.nan), gm)


def _recorded_variance(buffer: Any) -> Any:
    """Eq. (2): the unbiased variance of sqrt(B) over all its F x C entries (NaN for one entry,
    as torch.var)."""
    xp = namespace(buffer)
    if int(buffer.shape[0]) * int(buffer.shape[1]) == 1:
        return xp.asarray(math.nan, dtype=buffer.dtype, device=device(buffer))
    _, _, var = centered_moments(xp.sqrt(buffer), (0, 1), correction=1)
    return xp.reshape(var, ())


def _filter_gap(buffer: Any, recorded: Any, fp_window: int) -> Any:
    """Per channel, ``AM - GM - F rho`` of Eq. (4): the step is filtered where it is > 0."""
    xp = namespace(buffer)
    return (xp.mean(buffer, axis=0) - geometric_mean(buffer)) - fp_window * recorded


# --------------------------------------------------------------------------------------------
# the forward pass, shared by the function and the VJP
# --------------------------------------------------------------------------------------------


@dataclass
class _Pass:
    z: Any               # Eq. (7) before the affine map
    inv_s: Any           # 1 / sqrt(s_t + eps), keepdims
    s: Any               # Eq. (5), (C,)
    r: Any               # Eq. (6), keepdims
    t: float             # the training step (iters + 1; iters in inference)
    skip: bool           # Eq. (4), or F = 1
    filtered: bool       # Eq. (4) fired (what skip_counter counts)
    buffer_x2: Any       # Eq. (3)-(4)


def _forward(x: Any, st: _State, *, training: bool, axis: int, eps: float, fp_window: int,
             warmup_iters: int, outlier_filtration: bool, compensation_start: int, r_max: float) -> _Pass:
    xp = namespace(x)
    R = other_axes(x.ndim, axis)
    if not training:
        s = st.running_var
        inv_s = 1.0 / xp.sqrt(expand_to(s, x.ndim, axis) + eps)                 # Eq. (9)
        ones = xp.ones_like(inv_s)
        return _Pass(x * inv_s, inv_s, s, ones, float(st.iters), False, False, st.buffer_x2)
    t = float(st.iters) + 1.0
    q = xp.mean(x * x, axis=R)                                                   # Eq. (1)
    recorded = _recorded_variance(st.buffer_x2)                                 # Eq. (2)
    slot = int(t) % fp_window
    buffer = _with_row(st.buffer_x2, slot, q)                                    # Eq. (3)
    filtered = False
    if outlier_filtration and t >= warmup_iters:
        filtered = bool(xp.any(_filter_gap(buffer, recorded, fp_window) > 0))    # Eq. (4)
        if filtered:
            buffer = _with_row(buffer, slot, st.running_var)
    skip = filtered or fp_window == 1           # the official code: F = 1 has no window
    batch_phase = t <= fp_window or t < warmup_iters or skip
    s = q if batch_phase else geometric_mean(buffer)                             # Eq. (5)
    s_k = expand_to(s, x.ndim, axis)
    inv_s = 1.0 / xp.sqrt(s_k + eps)
    if t <= max(compensation_start, warmup_iters) or skip:                       # Eq. (6)
        r = xp.ones_like(inv_s)
    else:
        ratio = xp.sqrt(s_k + eps) / xp.sqrt(expand_to(st.running_var, x.ndim, axis) + eps)
        r = xp.clip(ratio, min=1.0 / r_max, max=r_max)
    return _Pass(x * inv_s, inv_s, s, r, t, skip, filtered, buffer)              # Eq. (7)


# --------------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------------


@oracle_function(OP)
def unified_norm(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    running_var: Any = None,
    ema_gz: Any = None,
    buffer_x2: Any = None,
    buffer_gz: Any = None,
    iters: Any = None,
    skip_counter: Any = None,
    *,
    training: bool = True,
    axis: int = -1,
    eps: float = 1e-5,
    momentum: float = 0.9,
    fp_window: int = 4,
    bp_window: int = 4,
    warmup_iters: int = 4000,
    outlier_filtration: bool = False,
    compensation_start: int = 1000,
    r_max: float = 5.0,
) -> tuple[Any, dict[str, Any]]:
    """Unified normalization; returns ``(y, new_state)``.

    Training updates ``running_var`` (Eq. 8), ``buffer_x2`` (Eq. 3-4), ``iters`` and
    ``skip_counter``; ``ema_gz`` and ``buffer_gz`` are returned as given (the backward pass
    updates them: :func:`unified_norm_vjp`).  Inference leaves the state unchanged.  A missing
    state slot starts at its initial value.
    """
    axis = _check(x, weight, bias, running_var, ema_gz, buffer_x2, buffer_gz, iters, skip_counter,
                  axis, fp_window, bp_window)
    st = _state(x, axis, fp_window, bp_window, running_var=running_var, ema_gz=ema_gz,
                buffer_x2=buffer_x2, buffer_gz=buffer_gz, iters=iters, skip_counter=skip_counter)
    p = _forward(x, st, training=training, axis=axis, eps=eps, fp_window=fp_window,
                 warmup_iters=warmup_iters, outlier_filtration=outlier_filtration,
                 compensation_start=compensation_start, r_max=r_max)
    state = {"running_var": st.running_var, "ema_gz": st.ema_gz, "buffer_x2": st.buffer_x2,
             "buffer_gz": st.buffer_gz, "iters": st.iters, "skip_counter": st.skip_counter}
    if training:
        state.update({
            "running_var": momentum * st.running_var + (1.0 - momentum) * p.s,  # Eq. (8)
            "buffer_x2": p.buffer_x2,
            "iters": st.iters + 1.0,
            "skip_counter": st.skip_counter + (1.0 if p.filtered else 0.0),
        })
    return affine(p.z, weight, bias, axis), state


@oracle_vjp(OP)
def unified_norm_vjp(
    dy: Any,
    x: Any,
    weight: Any = None,
    bias: Any = None,
    running_var: Any = None,
    ema_gz: Any = None,
    buffer_x2: Any = None,
    buffer_gz: Any = None,
    iters: Any = None,
    skip_counter: Any = None,
    *,
    training: bool = True,
    axis: int = -1,
    eps: float = 1e-5,
    momentum: float = 0.9,
    fp_window: int = 4,
    bp_window: int = 4,
    warmup_iters: int = 4000,
    outlier_filtration: bool = False,
    compensation_start: int = 1000,
    r_max: float = 5.0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The declared backward of the step ``unified_norm`` takes from this state: the gradients
    of ``<dy, y>`` w.r.t. x, weight and bias (those given; Eq. 14-15 in training, exact in
    inference) and the updated backward state, as ``(grads, {"buffer_gz": ..., "ema_gz": ...})``."""
    xp = namespace(x)
    axis = _check(x, weight, bias, running_var, ema_gz, buffer_x2, buffer_gz, iters, skip_counter,
                  axis, fp_window, bp_window)
    check_shape(OP, "dy", dy, tuple(x.shape), "the cotangent of y has the shape of x")
    st = _state(x, axis, fp_window, bp_window, running_var=running_var, ema_gz=ema_gz,
                buffer_x2=buffer_x2, buffer_gz=buffer_gz, iters=iters, skip_counter=skip_counter)
    p = _forward(x, st, training=training, axis=axis, eps=eps, fp_window=fp_window,
                 warmup_iters=warmup_iters, outlier_filtration=outlier_filtration,
                 compensation_start=compensation_start, r_max=r_max)
    R = other_axes(x.ndim, axis)
    h = dy if weight is None else dy * expand_to(weight, x.ndim, axis)
    back = {"buffer_gz": st.buffer_gz, "ema_gz": st.ema_gz}
    if not training:
        dx = h * p.inv_s                         # the eval map is linear in x: exact
    else:
        g = p.r * h                                                               # Eq. (10)
        lam = xp.mean(g * p.z, axis=R)
        slot = int(p.t) % bp_window
        window = _with_row(st.buffer_gz, slot, st.ema_gz if p.skip else lam)     # Eq. (11)
        single = p.t <= bp_window or p.t < warmup_iters or p.skip
        mu = lam if single else xp.mean(window, axis=0)                          # Eq. (12)
        ema = momentum * st.ema_gz + (1.0 - momentum) * mu                       # Eq. (13)
        c = mu if p.skip else ema
        dx = (g - expand_to(c, x.ndim, axis) * p.z) * p.inv_s                   # Eq. (14)
        back = {"buffer_gz": window, "ema_gz": ema}
    grads = {"x": dx}
    if weight is not None:
        grads["weight"] = sum_over(dy * p.r * p.z, R)                            # Eq. (15)
    if bias is not None:
        grads["bias"] = sum_over(dy, R)
    return grads, back


# --------------------------------------------------------------------------------------------
# the jump: the outlier filter's decision (spec ``discontinuities``)
# --------------------------------------------------------------------------------------------


def near_outlier_threshold(arrays: dict[str, Any], hparams: dict[str, Any], rel: float) -> dict[str, Any]:
    """Mark every element of x when the filter's decision of Eq. (4) lies within rounding of its
    threshold: ``|max_c(AM_c - GM_c - F rho)|`` within ``rel`` times the size of the terms it is
    formed from (the largest AM, times the roundings the statistics and the logarithms of GM
    carry).  The decision is global (any channel), so a flip changes every output of the step.

    ``arrays`` holds the inputs and, where the caller passes them, the state (``running_var``,
    ``buffer_x2``, ``iters``); without the state the decision cannot be evaluated and nothing
    is marked.
    """
    import numpy as np

    x = np.asarray(arrays["x"], dtype=np.float64)
    none = {"x": np.zeros(x.shape, dtype=bool)}
    state_keys = ("running_var", "buffer_x2", "iters")
    if not (hparams.get("training", True) and hparams.get("outlier_filtration", False)) or any(
            arrays.get(k) is None for k in state_keys):
        return none
    t = float(arrays["iters"]) + 1.0
    fp_window = int(hparams["fp_window"])
    if t < int(hparams["warmup_iters"]):
        return none
    axis = int(hparams.get("axis", -1)) % x.ndim
    R = other_axes(x.ndim, axis)
    with np.errstate(all="ignore"):
        q = np.mean(x * x, axis=R)
        old = np.asarray(arrays["buffer_x2"], dtype=np.float64)
        buffer = old.copy()
        buffer[int(t) % fp_window] = q
        gap = _filter_gap(buffer, _recorded_variance(old), fp_window)
        am = np.mean(buffer, axis=0)
        logs = np.abs(np.log(np.where(buffer > 0, buffer, 1.0)))
        n = max(int(np.prod([x.shape[a] for a in R])), 2)
        roundings = fp_window + int(buffer.size) + math.log2(n) + float(np.max(logs, initial=0.0))
        size = float(np.nanmax(np.abs(am), initial=0.0))
        near = abs(float(np.nanmax(gap))) <= rel * roundings * size
    return {"x": np.full(x.shape, near, dtype=bool)}
