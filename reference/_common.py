"""Argument checks shared by every oracle op.

Each check raises a ``ValueError`` (bad value or shape) or ``TypeError`` (bad kind of object)
whose message names the op, the argument, what was expected and what came, e.g.
``batch_norm: x has 3 channels on axis 1 but running_mean has shape (4,)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def fail(op: str, message: str, exc: type[Exception] = ValueError) -> None:
    """Raise ``exc`` with ``"<op>: <message>"``."""
    raise exc(f"{op}: {message}")


def check_ndim(op: str, name: str, x: Any, *, min_ndim: int, max_ndim: int | None = None) -> None:
    """``x.ndim`` must lie in ``[min_ndim, max_ndim]``."""
    if x.ndim < min_ndim or (max_ndim is not None and x.ndim > max_ndim):
        want = f">= {min_ndim}" if max_ndim is None else (
            f"{min_ndim}" if min_ndim == max_ndim else f"{min_ndim}..{max_ndim}")
        fail(op, f"{name} must have {want} dimensions, got {x.ndim} (shape {tuple(x.shape)})")


def check_nonempty(op: str, name: str, x: Any) -> None:
    """Reject zero-size arrays: a statistic over no elements is undefined."""
    if any(int(s) == 0 for s in x.shape):
        fail(op, f"{name} must not be empty, got shape {tuple(x.shape)}")


def check_shape(op: str, name: str, x: Any, expected: Sequence[int], why: str = "") -> None:
    """``x.shape`` must equal ``expected``; ``why`` says where the expectation comes from."""
    if x is None:
        return
    if tuple(x.shape) != tuple(expected):
        reason = f" ({why})" if why else ""
        fail(op, f"{name} must have shape {tuple(expected)}{reason}, got {tuple(x.shape)}")


def normalize_axis(op: str, name: str, axis: int, ndim: int) -> int:
    """Map a possibly negative axis into ``[0, ndim)``."""
    if not -ndim <= axis < ndim:
        fail(op, f"{name}={axis} is out of range for an array with {ndim} dimensions")
    return axis % ndim


def normalize_axes(op: str, name: str, axes: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Map an int or a sequence of ints to a sorted tuple of distinct non-negative axes."""
    raw = (axes,) if isinstance(axes, int) else tuple(axes)
    out = tuple(sorted({normalize_axis(op, name, int(a), ndim) for a in raw}))
    if len(out) != len(raw):
        fail(op, f"{name}={tuple(raw)} repeats an axis")
    if not out:
        fail(op, f"{name} must name at least one axis, got {tuple(raw)}")
    return out


def check_channel_params(
    op: str, x: Any, axis: int, params: dict[str, Any], *, min_ndim: int, not_batch: bool = False
) -> int:
    """x is non-empty with >= ``min_ndim`` dims; every given entry of ``params`` (per-channel
    weight, bias, running statistics) has shape (C,) for the C channels on ``axis``.  With
    ``not_batch`` the channel axis may not be axis 0.  Returns the normalized axis."""
    check_ndim(op, "x", x, min_ndim=min_ndim)
    check_nonempty(op, "x", x)
    axis = normalize_axis(op, "axis", axis, x.ndim)
    if not_batch and axis == 0:
        fail(op, f"axis={axis} is the batch axis; the channel axis must be one of 1..{x.ndim - 1} "
                 f"(or negative), x has shape {tuple(x.shape)}")
    channels = (int(x.shape[axis]),)
    for name, value in params.items():
        check_shape(op, name, value, channels, f"x has {channels[0]} channels on axis {axis}")
    return axis


def check_feature_params(op: str, x: Any, axes: Any, params: dict[str, Any]) -> tuple[int, ...]:
    """x is non-empty; every given entry of ``params`` (weight, bias) has x's shape on the
    normalized ``axes``.  Returns the normalized axes."""
    check_ndim(op, "x", x, min_ndim=1)
    check_nonempty(op, "x", x)
    axes = normalize_axes(op, "axes", axes, x.ndim)
    normalized_shape = tuple(int(x.shape[a]) for a in axes)
    for name, value in params.items():
        check_shape(op, name, value, normalized_shape,
                    f"x has shape {normalized_shape} on the normalized axes {axes}")
    return axes
