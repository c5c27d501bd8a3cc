"""A 2-D convolution written from its definition, with its two VJPs (shared by conv_bn and
weight_norm's data-dependent initialization).

Layout NCHW (PyTorch's): ``x`` is ``(N, C_in, H, W)``, the weight ``(C_out, C_in / groups, kh,
kw)``.  With stride ``s``, zero padding ``p``, dilation ``d`` and ``groups`` g (the same in both
spatial dimensions), output channel ``o`` of group ``G(o) = o // (C_out / g)`` is

    y[n, o, a, b] = sum_{c, i, j} w[o, c, i, j] * x_pad[n, G(o) C_in/g + c, a s + i d, b s + j d]

for ``a < H_out = (H + 2p - d (kh - 1) - 1) // s + 1`` (and the same for ``b``): a cross-correlation,
as every framework's ``conv2d`` computes it.  ``x_pad`` is ``x`` with ``p`` zeros on each side of
both spatial axes.

Evaluation (im2col): for each kernel offset ``(i, j)`` the strided slice
``x_pad[:, :, i d : i d + s (H_out - 1) + 1 : s, ...]`` holds, at ``[n, c, a, b]``, the input that
``w[:, c, i, j]`` multiplies at output position ``(a, b)``; stacking the ``kh kw`` slices gives the
columns ``cols[n, c, k, a, b]`` and the convolution is one contraction over ``(c, k)`` per group.

Backward.  ``y`` is bilinear in ``(x, w)``, so with ``dy = dL/dy``

    dw[o, c, k] = sum_{n, a, b} dy[n, o, a, b] cols[n, c, k, a, b]        (the same contraction
                                                                            over (n, a, b))
    dcols[n, c, k, a, b] = sum_{o in the group} dy[n, o, a, b] w[o, c, k]

and ``dx_pad`` is the adjoint of the slicing: each ``dcols[:, :, k]`` is added back at the strided
positions it was read from (:func:`_place`, zeros in between), overlapping windows summing; ``dx``
is ``dx_pad`` without the padding.  Only array API calls are used (slicing, ``stack``, ``concat``,
``reshape``, ``tensordot``): no in-place update, so the oracle runs on any array API namespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reference._backend import device, namespace
from reference._common import check_ndim, check_nonempty, fail

__all__ = ["ConvGeometry", "conv2d", "conv2d_vjp", "geometry"]


@dataclass(frozen=True)
class ConvGeometry:
    """The sizes of one convolution, checked: ``groups`` divides both channel counts and the
    dilated kernel fits in the padded input."""

    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    kh: int
    kw: int
    stride: int
    padding: int
    dilation: int
    groups: int

    @property
    def h_out(self) -> int:
        return (self.h + 2 * self.padding - self.dilation * (self.kh - 1) - 1) // self.stride + 1

    @property
    def w_out(self) -> int:
        return (self.w + 2 * self.padding - self.dilation * (self.kw - 1) - 1) // self.stride + 1

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c_out, self.h_out, self.w_out)


def geometry(op: str, x: Any, weight: Any, *, stride: int, padding: int, dilation: int, groups: int,
             x_name: str = "x", weight_name: str = "weight") -> ConvGeometry:
    """Check ``x`` (N, C_in, H, W) against ``weight`` (C_out, C_in / groups, kh, kw) and the
    hyper-parameters; ValueError naming the argument, what was expected and what came."""
    check_ndim(op, x_name, x, min_ndim=4, max_ndim=4)
    check_ndim(op, weight_name, weight, min_ndim=4, max_ndim=4)
    check_nonempty(op, x_name, x)
    check_nonempty(op, weight_name, weight)
    n, c_in, h, w = (int(s) for s in x.shape)
    c_out, c_group, kh, kw = (int(s) for s in weight.shape)
    for name, value, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1),
                             ("groups", groups, 1)):
        if int(value) < low:
            fail(op, f"{name} must be an int >= {low}, got {value}")
    if c_in % groups or c_out % groups:
        fail(op, f"groups={groups} must divide the input channels ({c_in}, axis 1 of {x_name}) and "
                 f"the output channels ({c_out}, axis 0 of {weight_name})")
    if c_group != c_in // groups:
        fail(op, f"{weight_name} must have C_in / groups = {c_in} / {groups} = {c_in // groups} input "
                 f"channels on axis 1 ({x_name} has shape {tuple(x.shape)}), got shape "
                 f"{tuple(weight.shape)}")
    geo = ConvGeometry(n, c_in, h, w, c_out, kh, kw, int(stride), int(padding), int(dilation), int(groups))
    if geo.h_out < 1 or geo.w_out < 1:
        fail(op, f"the kernel {kh}x{kw} with dilation {dilation} does not fit in the input {h}x{w} "
                 f"padded by {padding} on each side")
    return geo


def _slab(v: Any, axis: int, start: int, stop: int, step: int = 1) -> Any:
    """``v[..., start:stop:step, ...]`` on ``axis``."""
    return v[(slice(None),) * axis + (slice(start, stop, step), Ellipsis)]


def _zeros_like_on(xp: Any, v: Any, axis: int, size: int) -> Any:
    shape = list(v.shape)
    shape[axis] = size
    return xp.zeros(tuple(shape), dtype=v.dtype, device=device(v))


def _pad(xp: Any, v: Any, axis: int, before: int, after: int) -> Any:
    """``v`` with ``before`` / ``after`` zeros on ``axis``."""
    parts = []
    if before:
        parts.append(_zeros_like_on(xp, v, axis, before))
    parts.append(v)
    if after:
        parts.append(_zeros_like_on(xp, v, axis, after))
    return v if len(parts) == 1 else xp.concat(parts, axis=axis)


def _place(xp: Any, v: Any, axis: int, start: int, step: int, length: int) -> Any:
    """An array of ``length`` on ``axis`` holding ``v[k]`` at ``start + k step`` and 0 elsewhere:
    the adjoint of ``_slab(u, axis, start, start + step (n - 1) + 1, step)``."""
    n = int(v.shape[axis])
    if step > 1:
        # Interleave step - 1 zero slabs after each slab: stack on a new axis, merge the two.
        spread = xp.stack([v] + [xp.zeros_like(v)] * (step - 1), axis=axis + 1)
        shape = list(v.shape)
        shape[axis] = n * step
        v = _slab(xp.reshape(spread, tuple(shape)), axis, 0, step * (n - 1) + 1)
    span = step * (n - 1) + 1
    return _pad(xp, v, axis, start, length - start - span)


def _columns(xp: Any, x: Any, geo: ConvGeometry) -> Any:
    """``cols[n, c, k, a, b]`` = the input multiplied by kernel offset k = i kw + j at output (a, b)."""
    xp_ = _pad(xp, _pad(xp, x, 2, geo.padding, geo.padding), 3, geo.padding, geo.padding)
    s, d = geo.stride, geo.dilation
    slices = []
    for i in range(geo.kh):
        rows = _slab(xp_, 2, i * d, i * d + s * (geo.h_out - 1) + 1, s)
        for j in range(geo.kw):
            slices.append(_slab(rows, 3, j * d, j * d + s * (geo.w_out - 1) + 1, s))
    return xp.stack(slices, axis=2)


def conv2d(x: Any, weight: Any, geo: ConvGeometry) -> Any:
    """``y = conv(x, weight)`` (no bias), shape ``geo.out_shape``, in the arrays' dtype."""
    xp = namespace(x, weight)
    cols = _columns(xp, x, geo)
    ci, co = geo.c_in // geo.groups, geo.c_out // geo.groups
    k = geo.kh * geo.kw
    outs = []
    for g in range(geo.groups):
        w_g = xp.reshape(weight[g * co:(g + 1) * co, ...], (co, ci, k))
        # (N, ci, k, Ho, Wo) x (co, ci, k) over (ci, k) -> (N, Ho, Wo, co)
        y_g = xp.tensordot(cols[:, g * ci:(g + 1) * ci, ...], w_g, axes=([1, 2], [1, 2]))
        outs.append(xp.permute_dims(y_g, (0, 3, 1, 2)))
    return outs[0] if len(outs) == 1 else xp.concat(outs, axis=1)


def conv2d_vjp(dy: Any, x: Any, weight: Any, geo: ConvGeometry, *, need_x: bool = True) -> tuple[Any, Any]:
    """``(dx, dweight)`` of ``<dy, conv2d(x, weight)>`` (module docstring); ``dx`` is None unless
    ``need_x``."""
    xp = namespace(dy, x, weight)
    cols = _columns(xp, x, geo)
    ci, co = geo.c_in // geo.groups, geo.c_out // geo.groups
    k = geo.kh * geo.kw
    dws, dcols = [], []
    for g in range(geo.groups):
        dy_g = dy[:, g * co:(g + 1) * co, ...]
        # (N, co, Ho, Wo) x (N, ci, k, Ho, Wo) over (N, Ho, Wo) -> (co, ci, k)
        dws.append(xp.tensordot(dy_g, cols[:, g * ci:(g + 1) * ci, ...], axes=([0, 2, 3], [0, 3, 4])))
        if need_x:
            w_g = xp.reshape(weight[g * co:(g + 1) * co, ...], (co, ci, k))
            # (N, co, Ho, Wo) x (co, ci, k) over co -> (N, Ho, Wo, ci, k) -> (N, ci, k, Ho, Wo)
            dcols.append(xp.permute_dims(xp.tensordot(dy_g, w_g, axes=([1], [0])), (0, 3, 4, 1, 2)))
    dw = xp.reshape(dws[0] if len(dws) == 1 else xp.concat(dws, axis=0), tuple(weight.shape))
    if not need_x:
        return None, dw
    dc = dcols[0] if len(dcols) == 1 else xp.concat(dcols, axis=1)
    hp, wp = geo.h + 2 * geo.padding, geo.w + 2 * geo.padding
    s, d = geo.stride, geo.dilation
    dx_pad = None
    for i in range(geo.kh):
        for j in range(geo.kw):
            piece = _place(xp, _place(xp, dc[:, :, i * geo.kw + j, ...], 2, i * d, s, hp), 3, j * d, s, wp)
            dx_pad = piece if dx_pad is None else dx_pad + piece
    p = geo.padding
    return _slab(_slab(dx_pad, 2, p, p + geo.h), 3, p, p + geo.w), dw
