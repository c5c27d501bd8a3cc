"""Weight Normalization (Salimans & Kingma, 2016, arXiv:1602.07868).

A reparametrization of a weight tensor, no activations involved.  The direction ``v`` and the
magnitude ``g`` are the trained parameters; the layer uses

    w = g * v / ||v||                                                   (Eq. 2)

with one norm per slice: over every axis of ``v`` except ``dim`` (``dim=0``: one norm per output
unit of a ``(out, in, ...)`` weight, PyTorch's layout; ``dim=-1``: per output unit of an
``(..., in, out)`` kernel, Flax's and TF's layout; ``dim=None``: one norm of the whole tensor).
``g`` has ``v``'s shape with every axis but ``dim`` set to 1 (as torch stores it; ``()`` or all
ones when ``dim`` is None).  Without ``g`` the output is ``v / ||v||`` (Flax ``use_scale=False``).

Conventions (dialects.md §3a):

* ``eps`` (default 0, the paper and PyTorch).  ``eps_mode="add"``: ``s = sqrt(sum v^2 + eps)``,
  eps *inside* the root (Flax ``_l2_normalize``: ``v * rsqrt(sum v^2 + eps)``, eps 1e-12);
  ``eps_mode="max"``: ``s = sqrt(max(sum v^2, eps))``, a clamp (TF ``tf.nn.l2_normalize``,
  used by the official PixelCNN++ code's conv layers, epsilon 1e-12).  With eps = 0 both are the
  paper's ``s = ||v||``; a zero slice then has no direction and is refused (torch returns NaN).
* PyTorch's ``dim=-1`` is *not* the last axis: ``torch._weight_norm`` and ``norm_except_dim``
  treat -1 as "the whole tensor", and ``parametrizations.weight_norm(dim=None)`` passes -1.  Here
  ``dim`` is an ordinary axis (negative counts from the end) and ``None`` is the whole tensor, so
  torch's ``dim=-1`` maps to ``dim=None``.
* Initial ``g`` (:func:`init_g`): PyTorch sets ``g = ||v||`` so that ``w == v`` at registration;
  Flax initializes its ``scale`` to ones, so the function changes when the wrapper is applied.
  The paper's data-dependent initialization (Sec. 3) is :func:`data_dependent_init`, for linear
  and 2-D convolutional layers.

Backward (Eq. 3-4, generalized to eps).  Let ``s`` be the slice's denominator and
``v_hat = v / s``.  For ``eps_mode="add"``, ``ds/dv = v / s`` (also when eps > 0, since
``s^2 = sum v^2 + eps``), so with ``G = dL/dw``

    dg = <G, v> / s = <G, v_hat>                                        (Eq. 3)
    dv = (g / s) * (G - (<G, v> / s^2) v) = (g / s) * (G - dg * v_hat)  (Eq. 4)

(contract ``dw_i/dv_j = g (delta_ij / s - v_i v_j / s^3)`` with G).  For eps = 0 this is the
paper's projection: ``<dv, v> = 0``; for eps > 0, ``<dv, v> = g dg eps / s^2``.  For
``eps_mode="max"`` the clamped branch (``sum v^2 < eps``) has a constant ``s = sqrt(eps)``, so the
projection term drops: ``dv = g G / s``.  At the tie the norm branch is taken, as TF's Maximum
gradient does (``greater_equal`` selects the first argument).

Accuracy.  ``||v||`` is computed scaled by the slice's largest magnitude (the LAPACK ``dnrm2``
idea), so ``sum v^2`` neither overflows (|v| up to the float64 maximum; an unscaled sum of squares
overflows once |v| ~ 1e154) nor loses digits to subnormal squares (|v| < 1e-154).  eps is then
combined as ``hypot(||v||, sqrt(eps))``.  The norm is well conditioned, so w is accurate to a
few ulps on every adversarial family (offsets and constants need no special care here).
"""

from __future__ import annotations

from typing import Any

from reference._backend import as_float64, device, namespace
from reference._common import check_ndim, check_nonempty, check_shape, fail, normalize_axis
from reference.normalizers._conv import conv2d, geometry
from reference.normalizers._stats import centered_moments, l2_norm, other_axes
from reference.registry import oracle_function, oracle_vjp

OP = "weight_norm"


def _norm_axes(v: Any, dim: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(axes reduced by the norm, keepdims shape of g)`` for this ``dim``."""
    if dim is None:
        return tuple(range(v.ndim)), (1,) * v.ndim
    d = normalize_axis(OP, "dim", dim, v.ndim)
    shape = [1] * v.ndim
    shape[d] = int(v.shape[d])
    return other_axes(v.ndim, d), tuple(shape)


def _check(v: Any, g: Any, dim: int | None) -> tuple[int, ...]:
    check_ndim(OP, "v", v, min_ndim=1)
    check_nonempty(OP, "v", v)
    axes, g_shape = _norm_axes(v, dim)
    if g is not None and not (dim is None and tuple(g.shape) == ()):
        why = "v's shape with every axis but dim set to 1" + (" (or ())" if dim is None else "")
        check_shape(OP, "g", g, g_shape, f"{why}; v has shape {tuple(v.shape)}, dim={dim}")
    return axes


def _denominator(v: Any, axes: tuple[int, ...], eps: float, eps_mode: str) -> tuple[Any, Any]:
    """``(s, active)``: the slice denominator and whether ``s`` depends on ``v`` through the norm."""
    xp = namespace(v)
    norm = l2_norm(v, axes)
    root_eps = xp.sqrt(xp.full_like(norm, eps))
    if eps_mode == "max":
        # sqrt(max(sum v^2, eps)) = max(||v||, sqrt(eps)); ties go to the norm (TF Maximum grad).
        active = norm >= root_eps
        return xp.where(active, norm, root_eps), active
    # hypot(||v||, sqrt(eps)) = sqrt(sum v^2 + eps) without squaring a huge norm.
    hi = xp.maximum(norm, root_eps)
    lo = xp.minimum(norm, root_eps)
    ratio = lo / xp.where(hi > 0, hi, xp.ones_like(hi))
    return hi * xp.sqrt(1.0 + ratio * ratio), xp.ones_like(norm) > 0


def _direction(v: Any, axes: tuple[int, ...], eps: float, eps_mode: str) -> tuple[Any, Any, Any]:
    """``(v_hat, s, active)`` with ``v_hat = v / s``; refuses a zero slice when eps = 0."""
    xp = namespace(v)
    s, active = _denominator(v, axes, eps, eps_mode)
    if eps == 0 and bool(xp.any(s == 0)):
        fail(OP, "v has a slice that is all zeros, whose direction v/||v|| is undefined with "
                 "eps=0 (PyTorch returns NaN); use eps > 0")
    return v / s, s, active


@oracle_function(OP)
def weight_norm(
    v: Any,
    g: Any = None,
    *,
    dim: int | None = 0,
    eps: float = 0.0,
    eps_mode: str = "add",
) -> Any:
    """``w = g * v / ||v||`` (Eq. 2), the norm over every axis of ``v`` except ``dim``."""
    axes = _check(v, g, dim)
    v_hat, _, _ = _direction(v, axes, eps, eps_mode)
    return v_hat if g is None else g * v_hat


@oracle_vjp(OP)
def weight_norm_vjp(
    dw: Any,
    v: Any,
    g: Any = None,
    *,
    dim: int | None = 0,
    eps: float = 0.0,
    eps_mode: str = "add",
) -> dict[str, Any]:
    """Gradients of ``<dw, w>`` w.r.t. v and g (Eq. 3-4, generalized to eps; see module doc)."""
    xp = namespace(v)
    axes = _check(v, g, dim)
    check_shape(OP, "dw", dw, tuple(v.shape), "the cotangent of w has the shape of v")
    v_hat, s, active = _direction(v, axes, eps, eps_mode)
    dg = xp.sum(dw * v_hat, axis=axes, keepdims=True)                 # <G, v> / s
    # The projection term exists only where s depends on v (not on eps_mode="max"'s clamp).
    proj = xp.where(active, dg, xp.zeros_like(dg))
    gain = 1.0 / s if g is None else g / s
    grads = {"v": gain * (dw - proj * v_hat)}
    if g is not None:
        grads["g"] = xp.reshape(dg, tuple(g.shape))
    return grads


# --------------------------------------------------------------------------------------------
# Initialization
# --------------------------------------------------------------------------------------------


def init_g(v: Any, *, dim: int | None = 0, mode: str = "norm") -> Any:
    """The initial magnitude ``g`` for direction ``v``, in the shape :func:`weight_norm` expects.

    ``mode="norm"`` (PyTorch ``right_inverse``: ``g = norm_except_dim(v, 2, dim)``) makes
    ``w == v`` at registration; ``mode="ones"`` is Flax's ``scale_init=ones`` (``w = v/||v||``).
    ``dim=None`` gives a 0-d ``g`` (PyTorch and Flax both store a scalar).
    """
    v, _ = as_float64(v, "v", op=OP)
    xp = namespace(v)
    if mode not in ("norm", "ones"):
        fail(OP, f"init_g: mode must be 'norm' or 'ones', got {mode!r}")
    check_ndim(OP, "v", v, min_ndim=1)
    check_nonempty(OP, "v", v)
    axes, g_shape = _norm_axes(v, dim)
    g = l2_norm(v, axes) if mode == "norm" else xp.ones(g_shape, dtype=xp.float64, device=device(v))
    return xp.reshape(g, ()) if dim is None else g


def data_dependent_init(
    v: Any, x: Any, *, dim: int = 0, init_scale: float = 1.0, eps: float = 0.0, stride: int = 1,
    padding: int = 0, dilation: int = 1, groups: int = 1,
) -> tuple[Any, Any]:
    """The paper's data-dependent initialization (Sec. 3) of a weight-normalized linear or 2-D
    convolutional layer: ``(g, b)`` such that the initialized layer's pre-activations on the
    minibatch ``x`` have mean 0 and standard deviation ``init_scale`` per output unit.

    With unit-norm weights the pre-activation is ``t = x . v / ||v||`` (linear) or
    ``t = conv(x, v / ||v||)`` (one norm per output channel, over its input channels and kernel
    taps); ``mu`` and the *biased* ``sigma = sqrt(var + eps)`` are taken per output unit over every
    other axis of ``t`` (the batch for a linear layer; batch and both spatial axes for a conv), and

        g = init_scale / sigma,    b = -mu * init_scale / sigma

    so that ``y = g * t + b = init_scale * (t - mu) / sigma``.  ``b`` is ``(out,)``; ``g`` has the
    shape :func:`weight_norm` expects for ``dim``.

    Linear (2-D ``v``): ``x`` is ``(..., in)``; ``dim`` is v's output axis, 0 for PyTorch's
    ``(out, in)``, 1 or -1 for an ``(in, out)`` kernel.  ``g`` is ``(out, 1)`` or ``(1, out)``.

    Convolution (4-D ``v``, ``reference/normalizers/_conv.py``: ``stride``, zero ``padding``,
    ``dilation``, ``groups``): ``dim=0`` is PyTorch's layout, v ``(out, in / groups, kh, kw)`` and
    x ``(N, C_in, H, W)``, g ``(out, 1, 1, 1)``; ``dim=-1`` (or 3) is TensorFlow's, v
    ``(kh, kw, in / groups, out)`` (HWIO) and x ``(N, H, W, C_in)``, g ``(1, 1, 1, out)``.  On a
    1x1 convolution with stride 1 and no padding this is the linear case over the N H W pixels.

    Checked against the official code.  Linear: openai/pixel-cnn ``pixel_cnn_pp/nn.py::dense``
    (commit 0ff8ab5): ``V_norm = l2_normalize(V, [0])``, ``m, v = tf.nn.moments(x @ V_norm, [0])``
    (biased), ``scale_init = init_scale / sqrt(v + 1e-10)``, ``g = scale_init``,
    ``b = -m * scale_init``; openai/weightnorm ``lasagne/nn.py`` (commit 3503e68):
    ``g <- g / stdv``, ``b <- -m / stdv`` with ``stdv = sqrt(mean((t - m)^2))`` (no eps) starting
    from g = 1; ``keras/weightnorm.py::data_based_init``: eps 1e-10.  Convolution: pixel-cnn
    ``conv2d`` (NHWC, HWIO ``V``, ``l2_normalize(V, [0, 1, 2])``, moments over ``[0, 1, 2]``, eps
    1e-8 at commit 0ff8ab5, 1e-10 at bbc1568 where the init pass runs the layer with g = 1, b = 0
    and then assigns ``g *= scale_init``, ``b += -m_init * scale_init``: the same values); lasagne
    ``WeightNormLayer`` (moments over axes (0, 2, 3) of an NCHW conv output, W normalized over
    (1, 2, 3)).  tensorflow-addons ``WeightNormalization(data_init=True)`` differs: it takes the
    moments of the wrapped layer run with the *unnormalized* kernel v and its initial bias
    (``_naked_clone_layer`` with ``self.layer.get_weights()``) and sets ``g = 1 / sigma``,
    ``b = -mu / sigma`` from them, so its initialized layer is standardized only when every
    slice of v has unit norm (its own test uses an identity kernel).
    """
    v, _ = as_float64(v, "v", op=OP)
    x, _ = as_float64(x, "x", op=OP)
    xp = namespace(v, x)
    check_nonempty(OP, "v", v)
    check_nonempty(OP, "x", x)
    if not init_scale > 0:
        fail(OP, f"data_dependent_init: init_scale must be > 0, got {init_scale}")
    if not eps >= 0:
        fail(OP, f"data_dependent_init: eps must be >= 0, got {eps}")
    if v.ndim == 4:
        t, out_axis = _conv_preactivations(xp, v, x, dim, stride, padding, dilation, groups)
    else:
        check_ndim(OP, "v", v, min_ndim=2, max_ndim=2)
        if (stride, padding, dilation, groups) != (1, 0, 1, 1):
            fail(OP, f"data_dependent_init: stride, padding, dilation and groups are a convolution's "
                     f"(a 4-D v); v has shape {tuple(v.shape)}")
        t, out_axis = _linear_preactivations(xp, v, x, dim)
    mu, _, var = centered_moments(t, (0,))
    sigma = xp.sqrt(var + eps)
    if bool(xp.any(sigma == 0)):
        fail(OP, "data_dependent_init: a unit's pre-activation is constant on this batch "
                 "(sigma = 0); use a batch with more variety or eps > 0")
    g = init_scale / sigma                                                # (1, out)
    b = xp.reshape(-mu * g, (-1,))
    shape = [1] * v.ndim
    shape[out_axis] = int(v.shape[out_axis])
    return xp.reshape(g, tuple(shape)), b


def _linear_preactivations(xp: Any, v: Any, x: Any, dim: int) -> tuple[Any, int]:
    """``(t, out_axis)``: the pre-activations ``x . v / ||v||`` as (pixels, out)."""
    check_ndim(OP, "x", x, min_ndim=1)
    out_axis = normalize_axis(OP, "dim", dim, 2)
    in_axis = 1 - out_axis
    if int(x.shape[-1]) != int(v.shape[in_axis]):
        fail(OP, f"x has {int(x.shape[-1])} features on its last axis but v has "
                 f"{int(v.shape[in_axis])} inputs on axis {in_axis} (dim={dim} is the output axis)")
    v_hat, _, _ = _direction(v, (in_axis,), 0.0, "add")
    kernel = v_hat if out_axis == 1 else xp.permute_dims(v_hat, (1, 0))   # (in, out)
    return xp.reshape(xp.matmul(x, kernel), (-1, int(kernel.shape[1]))), out_axis


def _conv_preactivations(xp: Any, v: Any, x: Any, dim: int, stride: int, padding: int, dilation: int,
                         groups: int) -> tuple[Any, int]:
    """``(t, out_axis)``: the pre-activations ``conv(x, v / ||v||)`` as (pixels, out)."""
    out_axis = normalize_axis(OP, "dim", dim, 4)
    if out_axis not in (0, 3):
        fail(OP, f"data_dependent_init: a 4-D v is a conv weight with its output channels on axis 0 "
                 f"(PyTorch, (out, in / groups, kh, kw), x NCHW) or -1 (TensorFlow HWIO, x NHWC), "
                 f"got dim={dim}")
    check_ndim(OP, "x", x, min_ndim=4, max_ndim=4)
    if out_axis == 3:                                     # HWIO / NHWC -> OIHW / NCHW
        v, x = xp.permute_dims(v, (3, 2, 0, 1)), xp.permute_dims(x, (0, 3, 1, 2))
    geo = geometry(OP, x, v, stride=stride, padding=padding, dilation=dilation, groups=groups,
                   weight_name="v")
    v_hat, _, _ = _direction(v, (1, 2, 3), 0.0, "add")
    t = conv2d(x, v_hat, geo)                             # (N, out, Ho, Wo)
    return xp.reshape(xp.permute_dims(t, (0, 2, 3, 1)), (-1, geo.c_out)), out_axis
