"""Ops that exist only to exercise the contract (tests/specs/testing/*.toml, loaded by tests
that add ``tests/specs`` to ``NORMREF_SPECS``).

``class_center``: integer labels and a boolean mask as inputs.  Each row has a class label in
[0, C) and a validity flag; the class means are taken over the valid rows of the class, and every
row (valid or not) is centred by the mean of its class:

    n_c = #{j : l_j = c, m_j},   mu_c = (1 / n_c) sum_{j : l_j = c, m_j} x_j   (mu_c = 0 if n_c = 0)
    y_i = x_i - mu_{l_i}

VJP: x_j enters mu_{l_j} with weight m_j / n_{l_j}, and mu_c enters every row labelled c, so

    dx_j = dy_j - m_j / n_{l_j} * sum_{i : l_i = l_j} dy_i.

(The class-conditional centring of class-conditional normalization layers, reduced to its mean.)
"""

from __future__ import annotations

from typing import Any

from reference._backend import namespace
from reference.registry import oracle_function, oracle_vjp


def _memberships(x: Any, labels: Any, valid: Any, num_classes: int) -> tuple[Any, Any, Any]:
    """The one-hot labels M (N, C), the valid-row memberships, and 1/n_c (0 for an empty class)."""
    xp = namespace(x)
    onehot = xp.astype(labels[:, None] == xp.arange(num_classes)[None, :], x.dtype)
    members = onehot * xp.astype(valid, x.dtype)[:, None]
    counts = xp.sum(members, axis=0)
    inverse = xp.where(counts > 0, 1.0 / xp.where(counts > 0, counts, 1.0), 0.0)
    return onehot, members, xp.astype(inverse, x.dtype)


@oracle_function("class_center")
def class_center(x: Any, labels: Any, valid: Any, *, num_classes: int = 3) -> Any:
    xp = namespace(x)
    onehot, members, inverse = _memberships(x, labels, valid, num_classes)
    means = xp.matmul(xp.matrix_transpose(members), x) * inverse[:, None]    # mu_c, (C, D)
    return x - xp.matmul(onehot, means)


@oracle_vjp("class_center")
def class_center_vjp(dy: Any, x: Any, labels: Any, valid: Any, *, num_classes: int = 3) -> dict[str, Any]:
    xp = namespace(x)
    onehot, _, inverse = _memberships(x, labels, valid, num_classes)
    per_class = xp.matmul(xp.matrix_transpose(onehot), dy) * inverse[:, None]  # sum dy / n_c
    return {"x": dy - xp.astype(valid, x.dtype)[:, None] * xp.matmul(onehot, per_class)}


# --------------------------------------------------------------------------------------------
# backward_ema: state updated by the backward pass, and a custom backward
# --------------------------------------------------------------------------------------------
#
# The forward is the identity, y = x; the backward keeps an exponential moving average of the
# mean squared output gradient and divides by its root (the shape of PowerNorm's backward, which
# normalizes the gradient by a running statistic updated in the backward pass):
#
#     phi' = momentum phi + (1 - momentum) mean(dy^2),   dx = dy / sqrt(phi' + eps)
#
# dx is not the gradient of y = x (that is dy): the backward is "custom", pinned by its two
# properties; phi is state with updated_in = "backward", read and returned by the VJP.


@oracle_function("backward_ema")
def backward_ema(x: Any, phi: Any, *, momentum: float = 0.9, eps: float = 1e-5) -> tuple[Any, dict[str, Any]]:
    xp = namespace(x)
    return xp.asarray(x, copy=True), {"phi": phi}   # the forward leaves phi alone


@oracle_vjp("backward_ema")
def backward_ema_vjp(dy: Any, x: Any, phi: Any, *, momentum: float = 0.9, eps: float = 1e-5
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    xp = namespace(x)
    updated = momentum * phi + (1.0 - momentum) * xp.mean(dy * dy)
    return {"x": dy / xp.sqrt(updated + eps)}, {"phi": updated}


def backward_ema_init(x: Any) -> dict[str, Any]:
    """phi = 1: the statistic of unit gradients."""
    return {"phi": namespace(x).asarray(1.0, dtype=namespace(x).float64)}


# --------------------------------------------------------------------------------------------
# binned_ece: a metric with jumps (bin edges), no backward
# --------------------------------------------------------------------------------------------
#
# Expected calibration error over equal-width confidence bins (the binned metric of calibration
# papers, reduced to its bin sums):  b_i = min(floor(c_i B), B - 1),
#
#     ECE = (1/N) sum_b | sum_{i : b_i = b} (a_i - c_i) |,   a_i = 1 if prediction i is correct.
#
# A confidence on an edge k/B jumps from bin k-1 to bin k: computed in a dtype, c B may round
# across the edge, and both results are right within that dtype; the spec's ``discontinuities``
# counts such values so the harness does not call either side wrong.


@oracle_function("binned_ece")
def binned_ece(confidence: Any, correct: Any, *, num_bins: int = 5) -> Any:
    xp = namespace(confidence)
    bins = xp.clip(xp.floor(confidence * num_bins), 0.0, float(num_bins - 1))
    members = xp.astype(bins[:, None] == xp.astype(xp.arange(num_bins), confidence.dtype)[None, :],
                        confidence.dtype)
    gaps = xp.sum(members * (xp.astype(correct, confidence.dtype) - confidence)[:, None], axis=0)
    return xp.sum(xp.abs(gaps)) / confidence.shape[0]


def binned_ece_edges(inputs: dict[str, Any], hparams: dict[str, Any], rel: float) -> dict[str, Any]:
    """Which confidences c have c B within ``rel`` (relatively, at least 1) of an integer."""
    import numpy as np

    t = np.asarray(inputs["confidence"], dtype=np.float64) * hparams["num_bins"]
    with np.errstate(invalid="ignore"):
        return {"confidence": np.abs(t - np.round(t)) <= rel * np.maximum(np.abs(t), 1.0)}
