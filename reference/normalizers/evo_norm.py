"""EvoNorm normalization-activation layers (Liu, Brock, Simonyan & Le, 2020, arXiv:2004.02967).

One op with a ``variant`` knob: the paper's two layers, B0 (batch-dependent) and S0 (per sample),
and the variants timm ships (``timm/layers/evo_norm.py``).  With x laid out (N, C, *spatial) (the
channel on ``axis``), per-channel gamma, beta, v, and

    var_B  = biased variance over (N, *spatial) per channel         (the batch statistic)
    var_I  = biased variance over (*spatial) per (sample, channel)  (the instance statistic)
    ms_I   = mean of x^2 over (*spatial) per (sample, channel)      (instance "rms", no centering)
    var_G  = biased variance over (C/G channels, *spatial) per (sample, group)
    ms_G   = mean of x^2 over the same group
    sig(t) = 1 / (1 + exp(-t))

the variants are (eps always inside the square root, the same eps in every root):

    b0  y = x / max(sqrt(var_B + eps), v x + sqrt(var_I + eps)) * gamma + beta   (paper, TF, timm)
    b1  y = x / max(sqrt(var_B + eps), (x + 1) sqrt(ms_I + eps)) * gamma + beta  (timm EvoNorm2dB1)
    b2  y = x / max(sqrt(var_B + eps), sqrt(ms_I + eps) - x) * gamma + beta      (timm EvoNorm2dB2)
    s0  y = x sig(v x) / sqrt(var_G + eps) * gamma + beta                        (paper, TF, timm)
    s1  y = x sig(x) / sqrt(var_G + eps) * gamma + beta     (timm EvoNorm2dS1: SiLU(x), no v)
    s2  y = x sig(x) / sqrt(ms_G + eps) * gamma + beta      (timm EvoNorm2dS2: SiLU over group rms)

Sources (read, not copied): the official TensorFlow code, tensorflow/tpu
``models/official/resnet/resnet_model.py::evonorm`` (with ``_batch_std``, ``_instance_std``,
``_group_std``; commit 7dc921f, file last changed bee9c4f), and timm
``timm/layers/evo_norm.py`` (commit aa4b585, file last changed ad57dce).

B variants, training vs inference (``training``).  In training sqrt(var_B + eps) uses the batch
variance *with its gradient* (TF: ``tf.nn.moments`` without a stop-gradient; timm: ``x.var`` not
detached, only the running update is); in inference the moving variance replaces var_B and the
layer is an elementwise function of x given its instance statistic (b0) or ms_I (b1, b2).  The
moving variance (state ``running_var``, initial 1, per channel) is updated only in training, with

* ``momentum_convention="old_weight"`` (TF: ``moving_var -= (moving_var - var) * (1 - decay)``,
  decay 0.9): ``new = m old + (1 - m) batch``; ``"new_weight"`` (timm, m = 0.1):
  ``new = (1 - m) old + m batch``.  TF's decay 0.9 and timm's momentum 0.1 weigh the batch alike.
* ``running_var_correction``: 0 stores the biased batch variance (TF), 1 the unbiased
  ``n/(n-1) var_B`` (timm; n = N * prod(spatial)).  With n = 1 the factor is n / max(n - 1, 1)
  here; timm raises ZeroDivisionError there (``n / (n - 1)`` on Python floats).

``nonlinearity=False`` (TF ``nonlinearity``, timm ``apply_act``) drops the nonlinear part and v:
y = gamma x + beta, the moving variance is not updated.  timm's "a" classes (EvoNorm2dS0a, S1a,
S2a) differ from S0, S1, S2 only there: they still divide by the group statistic,
y = gamma x / sqrt(var_G + eps) + beta (S0a, S1a) or x / sqrt(ms_G + eps) (S2a); the knob
``keep_denominator=True`` selects that.  With nonlinearity on, S0a = S0 and so on (timm's S0a
only computes the denominator first); their eps default is 1e-3.  B variants ignore the knob.

Groups (S variants): channel c belongs to group c // (C/G), contiguous blocks as in GroupNorm.  When
G does not divide C, TF decrements G until it does (``group_fallback="decrement"``: the largest
divisor of C not above G, 1 at worst); timm asserts divisibility (``"raise"``).

Inputs the variant does not read are ignored and get a zero gradient: v for b1, b2, s1, s2 (and
for nonlinearity=False), ``running_var`` for the S variants (passed through unchanged).  A
missing v for b0 / s0 is v = 1, both sources' initial value (so s0 without v is s1).  Defaults are
the official TF ones (B0, eps 1e-5, decay 0.9, biased moving variance) but for ``max_tie``,
which defaults to torch's and jax's "split"; timm's B0 uses eps 1e-3.  timm takes every statistic
of ``x.float()``: float32 statistics even for a float64 module, a precision detail, not modelled.

Backward (``backward = "exact"``).  Write g = dy * gamma, z = y's normalized part.
``dgamma = sum_(N, spatial) dy z``, ``dbeta = sum_(N, spatial) dy``.

B variants: z = x / d, d = max(l, r) with l = sqrt(var_B + eps) (or the moving one) and r the
right branch.  Then dz/dx (direct) = 1/d and dz/dd = -x/d^2 = -z/d, so ``g_d = -g z / d``.  The
max routes g_d to one branch: a_l = 1 where l > r, 0 where l < r; at an exact tie l == r (a kink:
no derivative) ``max_tie="split"`` gives a_l = 1/2 (torch.maximum and jnp.maximum autograd, checked
on torch 2.13 and jax 0.10) and ``"first"`` gives a_l = 1 (TF's Maximum gradient sends a tie to
its first argument, ``greater_equal`` in tensorflow/python/ops/math_grad.py::_MaximumGrad, and TF
calls ``tf.maximum(left, right)``).  a_r = 1 - a_l.

* through l (training only): dl/dx_j = (x_j - mu_B) / (n_B l), so
  ``dx += (sum_(N, spatial) g_d a_l) (x - mu_B) / (n_B l)``.
* through r, with g_r = g_d a_r:
  b0, r = v x + sqrt(var_I + eps): ``dx += g_r v + (sum_spatial g_r) (x - mu_I) / (n_S s_I)``,
  ``dv = sum_(N, spatial) g_r x``;
  b1, r = (x + 1) q, q = sqrt(ms_I + eps), dq/dx_j = x_j / (n_S q):
  ``dx += g_r q + (sum_spatial g_r (x + 1)) x / (n_S q)``;
  b2, r = q - x: ``dx += -g_r + (sum_spatial g_r) x / (n_S q)``.
* direct: ``dx += g / d``.

S variants: z = a / D with a = x sig(t), t = v x (s0) or x (s1, s2), D the group statistic.
da/dx = sig(t) + t sig(t)(1 - sig(t)), da/dv = x^2 sig(t)(1 - sig(t)).  With h = g / D and
``dD = -sum_group(g a) / D^2``: ``dx = h da/dx + dD dD/dx`` where dD/dx_j = (x_j - mu_G)/(m D)
(std) or x_j / (m D) (rms), m = (C/G) prod(spatial); ``dv = sum_(N, spatial) h da/dv``.
With keep_denominator and no nonlinearity, a = x (da/dx = 1).

Accuracy: the statistics are the shared accurate centered moments (reference/normalizers/_stats.py);
sig(t) is evaluated from e = exp(-|t|) (never overflows) as 1/(1 + e) or e/(1 + e), and
sig(1 - sig) as e/(1 + e)^2, both to a few ulps for every t.  The mean squares ms_I, ms_G are not
rescaled, so |x| must stay below ~1e154 for b1, b2, s2.
"""

from __future__ import annotations

from typing import Any

from reference._backend import device, namespace
from reference._common import check_ndim, check_nonempty, check_shape, fail, normalize_axis
from reference.normalizers._stats import centered_moments, running_average
from reference.registry import oracle_function, oracle_vjp

OP = "evo_norm"

B_VARIANTS = ("b0", "b1", "b2")
S_VARIANTS = ("s0", "s1", "s2")

# On the channels-first view (N, C, S), S = prod(spatial): the batch statistic reduces over
# (0, 2), the instance one over (2,); on the grouped view (N, G, C/G, S) over (2, 3).
BATCH_AXES = (0, 2)
INSTANCE_AXES = (2,)
GROUP_AXES = (2, 3)


# --------------------------------------------------------------------------------------------
# Layout and checks
# --------------------------------------------------------------------------------------------


def _check(x: Any, params: dict[str, Any], axis: int) -> tuple[int, int]:
    """Validate x and the per-channel arrays; return ``(channel axis, C)``."""
    check_ndim(OP, "x", x, min_ndim=3)
    check_nonempty(OP, "x", x)
    axis = normalize_axis(OP, "axis", axis, x.ndim)
    if axis == 0:
        fail(OP, f"axis={axis} is the batch axis; the channel axis must be one of 1..{x.ndim - 1} "
                 f"(or negative), x has shape {tuple(x.shape)}")
    channels = int(x.shape[axis])
    for name, value in params.items():
        check_shape(OP, name, value, (channels,), f"x has {channels} channels on axis {axis}")
    return axis, channels


def effective_groups(channels: int, num_groups: int, group_fallback: str) -> int:
    """The number of groups used: ``num_groups`` if it divides C; else TF's decrement (the
    largest divisor of C below it) or an error (timm)."""
    if channels % num_groups == 0:
        return num_groups
    if group_fallback == "raise":
        fail(OP, f"num_groups={num_groups} must divide the {channels} channels of x "
                 f"(group_fallback='raise'; 'decrement' uses the largest divisor below it)")
    g = min(num_groups, channels)
    while g > 1 and channels % g != 0:
        g -= 1
    return g


def _perm(ndim: int, axis: int) -> tuple[int, ...]:
    """The permutation moving the channel axis to position 1 (the batch stays at 0)."""
    return (0, axis) + tuple(a for a in range(1, ndim) if a != axis)


def _to_ncs(x: Any, axis: int) -> tuple[Any, tuple[int, ...], tuple[int, ...]]:
    """The (N, C, S) view of x, plus the channels-first shape and permutation to undo it."""
    xp = namespace(x)
    perm = _perm(x.ndim, axis)
    xt = xp.permute_dims(x, perm) if perm != tuple(range(x.ndim)) else x
    shape_cf = tuple(int(s) for s in xt.shape)
    spatial = 1
    for s in shape_cf[2:]:
        spatial *= s
    return xp.reshape(xt, (shape_cf[0], shape_cf[1], spatial)), shape_cf, perm


def _from_ncs(v: Any, shape_cf: tuple[int, ...], perm: tuple[int, ...]) -> Any:
    xp = namespace(v)
    out = xp.reshape(v, shape_cf)
    if perm == tuple(range(len(perm))):
        return out
    inverse = [0] * len(perm)
    for position, a in enumerate(perm):
        inverse[a] = position
    return xp.permute_dims(out, tuple(inverse))


def _channel(p: Any) -> Any:
    """A per-channel vector shaped to broadcast over (N, C, S)."""
    return namespace(p).reshape(p, (1, -1, 1))


def _size(a: Any, axes: tuple[int, ...]) -> int:
    n = 1
    for ax in axes:
        n *= int(a.shape[ax])
    return n


def _sigmoid_parts(t: Any) -> tuple[Any, Any]:
    """``(sig(t), sig(t) (1 - sig(t)))`` from e = exp(-|t|): no overflow, accurate for all t."""
    xp = namespace(t)
    e = xp.exp(-xp.abs(t))
    one_plus = 1.0 + e
    sig = xp.where(t >= 0, 1.0 / one_plus, e / one_plus)
    return sig, e / (one_plus * one_plus)


# --------------------------------------------------------------------------------------------
# The shared forward pieces (the VJP recomputes them)
# --------------------------------------------------------------------------------------------


def _b_parts(x3: Any, v: Any, running_var: Any, variant: str, training: bool, eps: float
             ) -> dict[str, Any]:
    """B variants on (N, C, S): the left branch l, the right branch r and the statistics."""
    xp = namespace(x3)
    parts: dict[str, Any] = {}
    if training:
        _, centered_b, var_b = centered_moments(x3, BATCH_AXES)
        parts.update(centered_b=centered_b, var_b=var_b)
        left = xp.sqrt(var_b + eps)
    else:
        left = xp.sqrt(_channel(running_var) + eps)
    if variant == "b0":
        _, centered_i, var_i = centered_moments(x3, INSTANCE_AXES)
        s_i = xp.sqrt(var_i + eps)
        vv = 1.0 if v is None else _channel(v)
        right = vv * x3 + s_i
        parts.update(centered_i=centered_i, s_i=s_i, vv=vv)
    else:
        q = xp.sqrt(xp.mean(x3 * x3, axis=INSTANCE_AXES, keepdims=True) + eps)
        right = (x3 + 1.0) * q if variant == "b1" else q - x3
        parts.update(q=q)
    parts.update(left=left, right=right, d=xp.maximum(left, right))
    return parts


def _s_parts(x3: Any, v: Any, variant: str, nonlinearity: bool, groups: int, eps: float
             ) -> dict[str, Any]:
    """S variants on the grouped view (N, G, C/G, S): numerator a, denominator D, statistics."""
    xp = namespace(x3)
    n, c, s = (int(k) for k in x3.shape)
    xg = xp.reshape(x3, (n, groups, c // groups, s))
    parts: dict[str, Any] = {"xg": xg}
    if variant == "s2":
        den = xp.sqrt(xp.mean(xg * xg, axis=GROUP_AXES, keepdims=True) + eps)
    else:
        _, centered_g, var_g = centered_moments(xg, GROUP_AXES)
        den = xp.sqrt(var_g + eps)
        parts["centered_g"] = centered_g
    parts["den"] = den
    if nonlinearity:
        if variant == "s0" and v is not None:
            vg = xp.reshape(v, (1, groups, c // groups, 1))
            t = vg * xg
        else:  # s1, s2 (SiLU), or s0 with v = 1
            vg, t = 1.0, xg
        sig, dsig = _sigmoid_parts(t)
        parts.update(vg=vg, t=t, sig=sig, dsig=dsig, a=xg * sig)
    else:
        parts["a"] = xg
    return parts


def _normalized(x3: Any, v: Any, running_var: Any, hp: dict[str, Any], channels: int
                ) -> tuple[Any, dict[str, Any], str]:
    """``(z, parts, kind)``: the normalized part z on (N, C, S) (y = gamma z + beta), the pieces
    the VJP needs, and which form produced it (``"b"``, ``"s"`` or ``"affine"``)."""
    xp = namespace(x3)
    variant = hp["variant"]
    if variant in B_VARIANTS:
        if not hp["nonlinearity"]:
            return x3, {}, "affine"
        if not hp["training"] and running_var is None:
            fail(OP, f"inference (training=False) with variant {variant!r} needs running_var "
                     "(the moving variance: init_state gives ones)")
        parts = _b_parts(x3, v, running_var, variant, hp["training"], hp["eps"])
        return x3 / parts["d"], parts, "b"
    groups = effective_groups(channels, hp["num_groups"], hp["group_fallback"])
    if not hp["nonlinearity"] and not hp["keep_denominator"]:
        return x3, {}, "affine"
    parts = _s_parts(x3, v, variant, hp["nonlinearity"], groups, hp["eps"])
    z = parts["a"] / parts["den"]
    return xp.reshape(z, tuple(int(k) for k in x3.shape)), parts, "s"


# --------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------


def init_state(x: Any, *, variant: str = "b0", axis: int = 1) -> dict[str, Any]:
    """B variants: a moving variance of ones (TF and timm); S variants keep no state."""
    if variant not in B_VARIANTS:
        return {}
    xp = namespace(x)
    _, channels = _check(x, {}, axis)
    return {"running_var": xp.ones((channels,), dtype=x.dtype, device=device(x))}


@oracle_function(OP)
def evo_norm(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    v: Any = None,
    running_var: Any = None,
    *,
    variant: str = "b0",
    training: bool = True,
    nonlinearity: bool = True,
    keep_denominator: bool = False,
    axis: int = 1,
    eps: float = 1e-5,
    momentum: float = 0.9,
    momentum_convention: str = "old_weight",
    running_var_correction: int = 0,
    num_groups: int = 32,
    group_fallback: str = "decrement",
    max_tie: str = "split",
) -> tuple[Any, dict[str, Any]]:
    """EvoNorm of x (channels on ``axis``); returns ``(y, new_state)``."""
    hp = dict(variant=variant, training=training, nonlinearity=nonlinearity,
              keep_denominator=keep_denominator, eps=eps, num_groups=num_groups,
              group_fallback=group_fallback)
    axis, channels = _check(x, {"weight": weight, "bias": bias, "v": v, "running_var": running_var},
                            axis)
    x3, shape_cf, perm = _to_ncs(x, axis)
    z, parts, kind = _normalized(x3, v, running_var, hp, channels)
    y = z
    if weight is not None:
        y = y * _channel(weight)
    if bias is not None:
        y = y + _channel(bias)
    state: dict[str, Any] = {} if running_var is None else {"running_var": running_var}
    if kind == "b" and training and running_var is not None:
        xp = namespace(x)
        n = _size(x3, BATCH_AXES)
        bessel = n / max(n - running_var_correction, 1)
        batch = xp.reshape(parts["var_b"], (-1,)) * bessel
        state = {"running_var": running_average(running_var, batch, None, momentum,
                                                momentum_convention)}
    return _from_ncs(y, shape_cf, perm), state


@oracle_vjp(OP)
def evo_norm_vjp(
    dy: Any,
    x: Any,
    weight: Any = None,
    bias: Any = None,
    v: Any = None,
    running_var: Any = None,
    *,
    variant: str = "b0",
    training: bool = True,
    nonlinearity: bool = True,
    keep_denominator: bool = False,
    axis: int = 1,
    eps: float = 1e-5,
    momentum: float = 0.9,
    momentum_convention: str = "old_weight",
    running_var_correction: int = 0,
    num_groups: int = 32,
    group_fallback: str = "decrement",
    max_tie: str = "split",
) -> dict[str, Any]:
    """Gradients of ``<dy, y>`` w.r.t. x, weight, bias and v (those given)."""
    xp = namespace(x)
    hp = dict(variant=variant, training=training, nonlinearity=nonlinearity,
              keep_denominator=keep_denominator, eps=eps, num_groups=num_groups,
              group_fallback=group_fallback)
    axis, channels = _check(x, {"weight": weight, "bias": bias, "v": v, "running_var": running_var},
                            axis)
    check_shape(OP, "dy", dy, tuple(x.shape), "the cotangent of y has the shape of x")
    x3, shape_cf, perm = _to_ncs(x, axis)
    dy3, _, _ = _to_ncs(dy, axis)
    z, parts, kind = _normalized(x3, v, running_var, hp, channels)
    g = dy3 if weight is None else dy3 * _channel(weight)
    dv = None
    if kind == "b":
        dx, dv = _b_vjp(g, x3, z, parts, variant, training, max_tie)
    elif kind == "s":
        dx, dv = _s_vjp(g, parts, variant, nonlinearity)
    else:
        dx = g
    grads = {"x": _from_ncs(dx, shape_cf, perm)}
    if weight is not None:
        grads["weight"] = xp.sum(dy3 * z, axis=BATCH_AXES)
    if bias is not None:
        grads["bias"] = xp.sum(dy3, axis=BATCH_AXES)
    if v is not None:
        grads["v"] = xp.zeros_like(v) if dv is None else dv
    return grads


def _b_vjp(g: Any, x3: Any, z: Any, p: dict[str, Any], variant: str, training: bool,
           max_tie: str) -> tuple[Any, Any]:
    """B variants: ``(dx, dv)`` on (N, C, S); dv is None unless b0 (see the module docstring)."""
    xp = namespace(x3)
    left, right, d = p["left"], p["right"], p["d"]
    g_d = -g * z / d                              # d<g, x/d>/dd
    tie = 0.5 if max_tie == "split" else 1.0
    wins = xp.astype(left > right, g_d.dtype)
    ties = xp.astype(left == right, g_d.dtype)
    a_left = wins + tie * ties
    g_right = g_d * (1.0 - a_left)
    dx = g / d
    if training:                                  # through l = sqrt(var_B + eps)
        n_b = _size(x3, BATCH_AXES)
        g_left = xp.sum(g_d * a_left, axis=BATCH_AXES, keepdims=True)
        dx = dx + g_left * p["centered_b"] / (n_b * left)
    n_s = _size(x3, INSTANCE_AXES)
    dv = None
    if variant == "b0":                           # r = v x + sqrt(var_I + eps)
        s_sum = xp.sum(g_right, axis=INSTANCE_AXES, keepdims=True)
        dx = dx + g_right * p["vv"] + s_sum * p["centered_i"] / (n_s * p["s_i"])
        dv = xp.sum(g_right * x3, axis=BATCH_AXES)
    elif variant == "b1":                         # r = (x + 1) q
        q = p["q"]
        q_sum = xp.sum(g_right * (x3 + 1.0), axis=INSTANCE_AXES, keepdims=True)
        dx = dx + g_right * q + q_sum * x3 / (n_s * q)
    else:                                         # b2: r = q - x
        q = p["q"]
        q_sum = xp.sum(g_right, axis=INSTANCE_AXES, keepdims=True)
        dx = dx - g_right + q_sum * x3 / (n_s * q)
    return dx, dv


def _s_vjp(g: Any, p: dict[str, Any], variant: str, nonlinearity: bool) -> tuple[Any, Any]:
    """S variants: ``(dx, dv)`` on (N, C, S); dv is None unless s0 with the nonlinearity."""
    xp = namespace(g)
    xg, den, a = p["xg"], p["den"], p["a"]
    n, groups, per, s = (int(k) for k in xg.shape)
    gg = xp.reshape(g, (n, groups, per, s))
    h = gg / den                                   # d<g, a/D>/da
    m = per * s
    d_den = -xp.sum(gg * a, axis=GROUP_AXES, keepdims=True) / (den * den)
    spread = xg if variant == "s2" else p["centered_g"]
    dx = d_den * spread / (m * den)                # through D
    dv = None
    if nonlinearity:
        sig, dsig, t = p["sig"], p["dsig"], p["t"]
        dx = dx + h * (sig + t * dsig)             # d(x sig(v x))/dx
        if variant == "s0":
            # d(x sig(v x))/dv = x^2 sig'(v x); x * (x * sig') keeps huge x finite.
            dv = xp.reshape(xp.sum(h * (xg * (xg * dsig)), axis=(0, 3)), (-1,))
    else:
        dx = dx + h
    return xp.reshape(dx, (n, groups * per, s)), dv
