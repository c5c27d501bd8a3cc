"""Statistics and backward formulas shared by the normalizers.

Everything here is written once and reused: the accurate centered data / mean / variance, and the
two generic VJPs of the research notes (normalizers.md §0):

* VJP-STD(R): for ``x_hat = (x - mean_R x) * inv_std`` with ``inv_std = 1/sqrt(var_R x + eps)``
  (biased variance) and an upstream ``h = dL/dx_hat``,
  ``dx = inv_std * (h - mean_R(h) - x_hat * mean_R(h * x_hat))``.
  Derivation: d x_hat_i / d x_j = inv_std (delta_ij - 1/n) - inv_std x_hat_i x_hat_j / n, since
  d mean/dx_j = 1/n and d inv_std/dx_j = -inv_std^3 (x_j - mean)/n; contract with h.
* VJP-RMS(R): for ``x_hat = x * inv_rms`` with ``inv_rms = 1/sqrt(mean_R(x^2) + eps)``,
  ``dx = inv_rms * (h - x_hat * mean_R(h * x_hat))`` (the same derivation without the mean).

Accuracy: the mean is taken in two steps, a shift ``s = mean(x)`` and the mean of ``x - s``.
When the data sit near a large offset (mean 1e8, std 1e-3) ``x - s`` is exact (Sterbenz: both lie
within a factor 2) and its mean is accurate relative to the *spread*, so ``x - mean`` is accurate
to a few ulps of the spread.  A plain two-pass mean would carry the first pass's rounding error,
u * |mean| = 1e-8 here, i.e. 1e-5 of the spread.  The mean itself is returned as ``s + delta``
rounded (the state only needs it to float64 precision); the centered data never go through that
rounding.  Squares are not rescaled, so |x - mean| must stay below ~1e154.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from reference._backend import device, namespace
from reference._common import fail

#: The dtype a kernel saves its mean and 1/std in for the backward pass, or None.  The oracle never
#: sets it.  The harness's same-precision baseline sets it (``statistics_saved_in``) around a
#: half-precision backward pass, to measure what that design, PyTorch's CPU kernels' for float16
#: and bfloat16, errs by on the case at hand (conformance/tolerance.py, "Same-algorithm baseline").
_SAVED_STATISTICS: ContextVar[Any] = ContextVar("saved_statistics", default=None)


@contextlib.contextmanager
def statistics_saved_in(dtype: Any) -> Iterator[None]:
    """Within the block, ``standardize`` rounds its mean and 1/std to ``dtype`` (a NumPy dtype)."""
    token = _SAVED_STATISTICS.set(dtype)
    try:
        yield
    finally:
        _SAVED_STATISTICS.reset(token)


def centered_moments(
    x: Any, axes: tuple[int, ...], *, correction: int = 0
) -> tuple[Any, Any, Any]:
    """Return ``(mean, x - mean, var)`` over ``axes`` (keepdims), var with ``correction``.

    ``var = sum((x - mean)^2) / (n - correction)``; ``correction=0`` is the biased (population)
    variance every normalizer divides by, ``correction=1`` Bessel's unbiased estimate.
    """
    xp = namespace(x)
    shift = xp.mean(x, axis=axes, keepdims=True)
    shifted = x - shift
    delta = xp.mean(shifted, axis=axes, keepdims=True)
    centered = shifted - delta
    n = reduction_size(x, axes)
    var = xp.sum(centered * centered, axis=axes, keepdims=True) / (n - correction)
    return shift + delta, centered, var


def reduction_size(x: Any, axes: tuple[int, ...]) -> int:
    """Number of elements each reduction over ``axes`` sees."""
    n = 1
    for a in axes:
        n *= int(x.shape[a])
    return n


def standardize(x: Any, axes: tuple[int, ...], eps: float) -> tuple[Any, Any, Any, Any]:
    """``(x_hat, inv_std, mean, biased_var)`` for ``x_hat = (x - mean) / sqrt(var + eps)``."""
    xp = namespace(x)
    mean, centered, var = centered_moments(x, axes)
    inv_std = 1.0 / xp.sqrt(var + eps)
    saved = _SAVED_STATISTICS.get()
    if saved is not None:  # the baseline's emulation of statistics saved in a half type
        mean = mean.astype(saved).astype(x.dtype)
        inv_std = inv_std.astype(saved).astype(x.dtype)
        return (x - mean) * inv_std, inv_std, mean, var
    return centered * inv_std, inv_std, mean, var


def standardize_vjp(h: Any, x_hat: Any, inv_std: Any, axes: tuple[int, ...]) -> Any:
    """VJP-STD(R): gradient w.r.t. x of ``<h, x_hat(x)>`` through the batch mean and variance."""
    xp = namespace(h)
    mean_h = xp.mean(h, axis=axes, keepdims=True)
    mean_hx = xp.mean(h * x_hat, axis=axes, keepdims=True)
    return inv_std * (h - mean_h - x_hat * mean_hx)


def rms_vjp(h: Any, x_hat: Any, inv_rms: Any, axes: tuple[int, ...]) -> Any:
    """VJP-RMS(R): gradient w.r.t. x of ``<h, x * inv_rms(x)>`` with eps inside the root."""
    xp = namespace(h)
    mean_hx = xp.mean(h * x_hat, axis=axes, keepdims=True)
    return inv_rms * (h - x_hat * mean_hx)


def other_axes(ndim: int, keep: tuple[int, ...] | int) -> tuple[int, ...]:
    """All axes of an ``ndim`` array except ``keep``."""
    keep = (keep,) if isinstance(keep, int) else keep
    return tuple(a for a in range(ndim) if a not in keep)


def expand_to(v: Any, ndim: int, axes: int | tuple[int, ...]) -> Any:
    """Reshape a parameter laid out along ``axes`` of an ``ndim`` array so it broadcasts there.

    A per-channel vector (``axes`` an int) or a tensor of the normalized shape (a tuple, in
    increasing axis order) gets size 1 on every other axis.
    """
    xp = namespace(v)
    axes = (axes,) if isinstance(axes, int) else axes
    shape = [1] * ndim
    for a, size in zip(axes, v.shape, strict=True):
        shape[a] = int(size)
    return xp.reshape(v, tuple(shape))


def affine(x_hat: Any, weight: Any, bias: Any, axes: int | tuple[int, ...]) -> Any:
    """``gamma * x_hat + beta`` with gamma, beta laid out along ``axes`` (either may be None)."""
    y = x_hat
    if weight is not None:
        y = y * expand_to(weight, x_hat.ndim, axes)
    if bias is not None:
        y = y + expand_to(bias, x_hat.ndim, axes)
    return y


def running_standardize(
    x: Any, running_mean: Any, running_var: Any, eps: float, axis: int
) -> tuple[Any, Any]:
    """``(x_hat, inv_std)`` with the running statistics in place of the batch's (inference)."""
    xp = namespace(x)
    inv_std = 1.0 / xp.sqrt(expand_to(running_var, x.ndim, axis) + eps)
    return (x - expand_to(running_mean, x.ndim, axis)) * inv_std, inv_std


def sum_over(v: Any, axes: tuple[int, ...]) -> Any:
    """Sum over ``axes``; no reduction at all when there are none (e.g. x is a single row)."""
    if not axes:
        return v
    return namespace(v).sum(v, axis=axes)


def l2_norm(v: Any, axes: tuple[int, ...] | None = None) -> Any:
    """``||v||_2`` over ``axes`` (all axes if None, keepdims), scaled by the largest magnitude.

    NumPy's ``vector_norm`` squares without scaling and overflows from about 1e154; dividing by
    max|v| first keeps every square in [0, 1].  A zero slice has norm 0 (divided by 1, not 0).
    """
    xp = namespace(v)
    big = xp.max(xp.abs(v), axis=axes, keepdims=True)
    r = v / xp.where(big > 0, big, xp.ones_like(big))
    norm = big * xp.sqrt(xp.sum(r * r, axis=axes, keepdims=True))
    # An infinite entry makes the norm infinite (IEEE hypot), not inf/inf = NaN; NaN stays NaN.
    return xp.where(xp.isinf(big), big, norm)


def running_state(op: str, x: Any, running_mean: Any, running_var: Any, num_batches_tracked: Any,
                  refusal: str = "track_running_stats=True needs running_mean and running_var"
                  ) -> dict[str, Any]:
    """The running statistics of a BatchNorm-like layer as its state dict, the batch counter 0
    (beside x) when not given; without a running mean or variance, ``refusal`` (ValueError)."""
    if running_mean is None or running_var is None:
        fail(op, refusal)
    count = (num_batches_tracked if num_batches_tracked is not None
             else namespace(x).asarray(0.0, dtype=namespace(x).float64, device=device(x)))
    return {"running_mean": running_mean, "running_var": running_var, "num_batches_tracked": count}


def running_average(
    old: Any, batch: Any, count: Any, momentum: float | None, momentum_convention: str
) -> Any:
    """One step of a running statistic (BatchNorm, InstanceNorm with tracked stats).

    ``new_weight`` (PyTorch): ``(1 - m) old + m batch``; ``old_weight`` (Flax, Keras, ONNX):
    ``m old + (1 - m) batch``; ``momentum=None``: cumulative average, the new batch weighted
    ``1 / count`` where ``count`` already includes it.
    """
    if momentum is None:
        factor = 1.0 / count
        return (1.0 - factor) * old + factor * batch
    if momentum_convention == "new_weight":
        return (1.0 - momentum) * old + momentum * batch
    return momentum * old + (1.0 - momentum) * batch
