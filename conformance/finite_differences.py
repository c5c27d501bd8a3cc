"""Numerical directional derivatives of functions over trees of arrays: the finite-difference
machinery behind the checks of conformance/gradcheck.py.

Inputs and outputs are *trees* (an array, a tuple or list of trees, or a dict of trees); only
floating leaves are perturbed, and each perturbed input is rounded back to its leaf's dtype, so
``f`` sees inputs of the precision it was given.

* :func:`directional_derivative` — d/dt f(x + t v) at t = 0 by SciPy's iterative finite
  differences (``scipy.differentiate.derivative``: central stencils of order 8, the step halved
  each iteration, Richardson-style error estimate from successive iterates), one derivative per
  output element from a shared, cached set of evaluations of ``f``.
* :func:`numerical_jacobian` — the full Jacobian, one directional derivative per input element.

The tree helpers (``_leaves``, ``_rebuild``, ``_flat64``, ``_mask``, ``_perturb``, ``_min_step``,
...) are internal: conformance/gradcheck.py builds its checks on them, nothing else should.
Both functions and :class:`Derivative` stay importable from :mod:`conformance.gradcheck`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Derivative", "Tree", "directional_derivative", "numerical_jacobian"]

Tree = Any


# --------------------------------------------------------------------------------------------
# Trees
# --------------------------------------------------------------------------------------------


def _leaves(tree: Tree) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for k in tree for leaf in _leaves(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree]


def _rebuild(tree: Tree, leaves: list[Any]) -> Tree:
    it = iter(leaves)

    def build(node: Tree) -> Tree:
        if isinstance(node, dict):
            return {k: build(v) for k, v in node.items()}
        if isinstance(node, (tuple, list)):
            return type(node)(build(v) for v in node)
        return next(it)

    return build(tree)


def _is_float(leaf: Any) -> bool:
    return isinstance(leaf, np.ndarray) and leaf.dtype.kind == "f" or (
        isinstance(leaf, np.ndarray) and leaf.dtype.name == "bfloat16"
    )


def _flat64(tree: Tree) -> np.ndarray:
    """All leaves of an output tree as one float64 vector (None leaves are skipped)."""
    parts = [np.asarray(leaf, dtype=np.float64).ravel() for leaf in _leaves(tree) if leaf is not None]
    return np.concatenate(parts) if parts else np.zeros(0)


def _unit_roundoff(dtype: np.dtype) -> float:
    if dtype.name == "bfloat16":
        return 2.0**-8
    return float(np.finfo(dtype).eps) / 2.0


def _mask(inputs: Tree, wrt: Sequence[str] | None) -> list[bool]:
    """Which leaves are perturbed: floating leaves, restricted to dict keys ``wrt`` if given."""
    if wrt is not None:
        if not isinstance(inputs, dict):
            raise TypeError(f"wrt= needs dict inputs, got {type(inputs).__name__}")
        unknown = set(wrt) - set(inputs)
        if unknown:
            raise ValueError(f"wrt names unknown inputs {sorted(unknown)}; inputs are {sorted(inputs)}")
        flags = []
        for key, value in inputs.items():
            flags += [key in wrt and _is_float(leaf) for leaf in _leaves(value)]
        return flags
    return [_is_float(leaf) for leaf in _leaves(inputs)]


def _perturb(inputs: Tree, t: float, direction: Tree) -> Tree:
    """``x + t v`` leaf by leaf, rounded back to each leaf's dtype (non-float leaves untouched)."""
    out = []
    for leaf, v in zip(_leaves(inputs), _leaves(direction), strict=True):
        if v is None or not _is_float(leaf):
            out.append(leaf)
        else:
            out.append((np.asarray(leaf, dtype=np.float64) + t * v).astype(leaf.dtype))
    return _rebuild(inputs, out)


def _min_step(inputs: Tree, mask: list[bool]) -> float:
    """The smallest step (in units of the direction) worth taking: u**(1/3), u of the coarsest leaf."""
    us = [_unit_roundoff(leaf.dtype) for leaf, on in zip(_leaves(inputs), mask, strict=True) if on]
    return max(us, default=2.0**-53) ** (1.0 / 3.0)


# --------------------------------------------------------------------------------------------
# Numerical derivatives
# --------------------------------------------------------------------------------------------


@dataclass
class Derivative:
    """A numerical directional derivative: value and error estimate per output element."""

    value: np.ndarray
    error: np.ndarray
    nfev: int
    success: bool


def directional_derivative(
    f: Callable[[Tree], Tree],
    inputs: Tree,
    direction: Tree,
    *,
    step: float = 0.1,
    min_step: float | None = None,
    rtol: float = 1e-12,
) -> Derivative:
    """``d/dt f(inputs + t * direction)`` at t = 0, flattened to float64, with error estimates.

    SciPy's ``derivative`` treats each output element as its own scalar problem; all of them
    share the same abscissae t, so ``f`` is evaluated once per distinct t (cached) and the call
    count reported in ``nfev`` is the true number of evaluations of ``f``.
    """
    from scipy.differentiate import derivative

    cache: dict[float, np.ndarray] = {}

    def phi_at(t: float) -> np.ndarray:
        key = float(t)
        if key not in cache:
            cache[key] = _flat64(f(_perturb(inputs, key, direction)))
        return cache[key]

    m = phi_at(0.0).size
    if m == 0:
        return Derivative(np.zeros(0), np.zeros(0), len(cache), True)
    floor = min_step if min_step is not None else 0.0
    # Halving from `step`, stop before going under the floor: step / 2**(maxiter-1) >= floor.
    maxiter = 10 if floor <= 0 else max(1, min(10, int(math.log2(step / floor)) + 1))

    def elementwise(t: np.ndarray, idx: np.ndarray) -> np.ndarray:
        # scipy passes idx with the active elements' leading shape; align it with t's.
        idx = np.broadcast_to(np.reshape(idx, np.shape(idx) + (1,) * (t.ndim - np.ndim(idx))), t.shape)
        out = np.empty(t.shape)
        for pos in np.ndindex(t.shape):
            out[pos] = phi_at(t[pos])[int(idx[pos])]
        return out

    res = derivative(
        elementwise,
        np.zeros(m),
        args=(np.arange(m),),
        initial_step=step,
        maxiter=maxiter,
        tolerances={"atol": 0.0, "rtol": rtol},
    )
    error = np.where(np.isfinite(res.error), res.error, np.inf)
    return Derivative(np.asarray(res.df, dtype=np.float64), error, len(cache), bool(np.all(res.success)))


def numerical_jacobian(
    f: Callable[[Tree], Tree],
    inputs: Tree,
    *,
    wrt: Sequence[str] | None = None,
    step: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Full Jacobian (outputs flattened × perturbed input elements flattened) and its error estimate.

    Column k is the directional derivative along the k-th unit vector scaled by its leaf's RMS,
    divided by that scale.  Costs O(number of input elements) directional derivatives.
    """
    mask = _mask(inputs, wrt)
    leaves = _leaves(inputs)
    floor = _min_step(inputs, mask)
    cols, errs = [], []
    for i, (leaf, on) in enumerate(zip(leaves, mask, strict=True)):
        if not on:
            continue
        x = np.asarray(leaf, dtype=np.float64)
        s = float(np.sqrt(np.mean(x * x))) if x.size else 1.0
        s = s if s > 0 and math.isfinite(s) else 1.0
        for k in range(x.size):
            e = np.zeros(x.size)
            e[k] = s
            direction = _rebuild(
                inputs,
                [
                    e.reshape(x.shape) if j == i else (np.zeros(np.shape(lf)) if _is_float(lf) else None)
                    for j, lf in enumerate(leaves)
                ],
            )
            d = directional_derivative(f, inputs, direction, step=step, min_step=floor)
            cols.append(d.value / s)
            errs.append(d.error / s)
    if not cols:
        raise ValueError("numerical_jacobian: no floating inputs to differentiate")
    return np.stack(cols, axis=1), np.stack(errs, axis=1)
