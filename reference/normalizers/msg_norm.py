"""Message Normalization, MsgNorm (Li, Xiong, Thabet & Ghanem, "DeeperGCN", arXiv:2006.07739).

A graph convolution aggregates the messages of a node's neighbours into m_v and updates the node
from its own features h_v and m_v.  MsgNorm rescales the aggregated message to the norm of the
node's features before the update (Sec. 4.3, the update h_v' = MLP(h_v + MsgNorm(h_v, m_v))):

    MsgNorm(h_v, m_v) = s * ||h_v||_2 * m_v / ||m_v||_2

per node (row), s a scalar initialized to 1 and learnable or not (``learn_msg_scale``).  Written
with the project's L2 normalization (``l2_normalize``, whose eps conventions this op reuses):

    y = s * ||x|| * l2_normalize(msg),      l2_normalize(m) = m / max(||m||, floor)

over ``axes`` (one row per node: the last axis in PyG, ``dim=1`` of an (N, D) tensor in the
official deep_gcns_torch).  Both codes normalize the message with ``F.normalize(msg, p=2)``
(floor = eps = 1e-12 on the norm: ``eps_clamps = "norm"``) and take ``x.norm(p=2)`` unclamped,
so ||y|| = s ||x|| wherever ||msg|| >= floor, and a zero message row gives 0 (l2_normalize's
convention).  ``scale`` is optional: absent, s = 1 (the default, frozen s of both codes).

Backward.  With u = l2_normalize(msg) and r = ||x|| per row:

    dscale = sum(dy * r * u)                                   (over every element)
    dmsg   = l2_normalize_vjp(s r dy, msg)                     (u's cotangent is s r dy)
    dx     = s <dy, u> x / r                                   (d||x||/dx = x / ||x||)

A zero row of x has no derivative of its norm; dx there is 0, the minimum-norm subgradient and
PyTorch's (``linalg.vector_norm``'s backward masks a zero norm).  A zero message row at eps = 0
has no derivative either: l2_normalize's NaN.

Accuracy: ||x|| is the overflow-safe scaled norm (``_stats.l2_norm``): rows near 1e±200 do not
overflow or underflow, and y is within a few ulps of the exact value plus the row-length terms of
the two norms.
"""

from __future__ import annotations

from typing import Any

from reference._backend import namespace
from reference._common import check_feature_params, check_shape
from reference.normalizers import l2_normalize as _l2
from reference.normalizers._stats import l2_norm
from reference.registry import oracle_function, oracle_vjp

OP = "msg_norm"


def _raw(fn: Any) -> Any:
    """The undecorated function: arrays stay in their dtype (the spec was validated already)."""
    return getattr(fn, "__wrapped__", fn)


def _check(x: Any, msg: Any, scale: Any, axes: tuple[int, ...]) -> tuple[int, ...]:
    axes = check_feature_params(OP, x, axes, {})
    check_shape(OP, "msg", msg, tuple(x.shape), "one message per row of x")
    check_shape(OP, "scale", scale, (1,), "the learnable scalar s, as PyG's Parameter of shape (1,)")
    return axes


@oracle_function(OP)
def msg_norm(
    x: Any,
    msg: Any,
    scale: Any = None,
    *,
    axes: tuple[int, ...] = (-1,),
    eps: float = 1e-12,
    eps_clamps: str = "norm",
) -> Any:
    """``s * ||x|| * msg / max(||msg||, floor)`` per row over ``axes`` (s = 1 without ``scale``)."""
    axes = _check(x, msg, scale, axes)
    unit = _raw(_l2.l2_normalize)(msg, axes=axes, eps=eps, eps_clamps=eps_clamps)
    y = l2_norm(x, axes) * unit
    return y if scale is None else scale * y


@oracle_vjp(OP)
def msg_norm_vjp(
    dy: Any,
    x: Any,
    msg: Any,
    scale: Any = None,
    *,
    axes: tuple[int, ...] = (-1,),
    eps: float = 1e-12,
    eps_clamps: str = "norm",
) -> dict[str, Any]:
    """Gradients of ``<dy, y>`` w.r.t. x, msg and scale (if given)."""
    xp = namespace(x)
    axes = _check(x, msg, scale, axes)
    check_shape(OP, "dy", dy, tuple(x.shape), "the cotangent of y has the shape of x")
    hp = {"axes": axes, "eps": eps, "eps_clamps": eps_clamps}
    unit = _raw(_l2.l2_normalize)(msg, **hp)
    norm = l2_norm(x, axes)
    s_dy = dy if scale is None else scale * dy
    # d||x||/dx = x / ||x||; at a zero row the subgradient 0 (x is 0 there, any finite divisor gives it).
    safe = xp.where(norm == 0, xp.ones_like(norm), norm)  # a zero row only: a NaN norm stays NaN
    along_unit = xp.sum(s_dy * unit, axis=axes, keepdims=True)
    grads = {
        "x": along_unit * x / safe,
        "msg": _raw(_l2.l2_normalize_vjp)(s_dy * norm, msg, **hp)["x"],
    }
    if scale is not None:
        grads["scale"] = xp.reshape(xp.sum(dy * norm * unit), (1,))
    return grads
