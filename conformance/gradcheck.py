"""Framework-agnostic numerical derivative checks.

Works on any Python callable over NumPy arrays.  Inputs and outputs are *trees*: an array, a tuple
or list of trees, or a dict of trees; ``f(x)`` is called with one argument of the same structure as
``inputs``.  Only floating leaves are perturbed.

* :func:`directional_derivative` — d/dt f(x + t v) at t = 0, by SciPy's iterative finite
  differences (``scipy.differentiate.derivative``: central stencils of order 8, the step halved
  each iteration, Richardson-style error estimate from successive iterates), one derivative per
  output element from a shared set of evaluations of ``f``.
* :func:`numerical_jacobian` — the full Jacobian, one directional derivative per input element
  (O(input size) calls; for small inputs and debugging).
* :func:`check_vjp` — the adjoint identity ``<u, J v> = <J^T u, v>`` on a few random directions.
  ``J v`` is a directional derivative of the scalar ``<u, f(x + t v)>``, so the cost is
  O(directions) evaluations of ``f``, independent of the input size.
* :func:`check_jvp` — a Taylor-remainder test: ``r(h) = ||f(x + h v) - f(x) - h jvp(x, v)||`` must
  shrink at order 2 as h halves (order 1 if the JVP is wrong).  No step size to tune.
* :func:`check_hvp` — second order: the finite difference of a gradient function against a given
  HVP, or, with no HVP, the symmetry ``<w, H v> = <v, H w>`` that every true gradient has.

Steps are dtype-aware: directions are scaled by each leaf's RMS (or ``scale``), the step never
goes below ``u**(1/3)`` of the least precise perturbed leaf (u its unit roundoff), where the
central-difference truncation and rounding errors balance.  Failures raise
:class:`GradcheckError` whose message says which side is analytic and which numerical, the
direction, both values, their difference, the error estimate and the tolerance.

This module holds the checks; the finite differences they compare against (with the tree helpers
both share) are conformance/finite_differences.py, whose :func:`directional_derivative`,
:func:`numerical_jacobian` and :class:`Derivative` are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conformance.finite_differences import (
    Derivative,
    Tree,
    _flat64,
    _is_float,
    _leaves,
    _mask,
    _min_step,
    _perturb,
    _rebuild,
    _unit_roundoff,
    directional_derivative,
    numerical_jacobian,
)

__all__ = [
    "Derivative",
    "DirectionCheck",
    "GradcheckError",
    "GradcheckResult",
    "Tree",
    "check_hvp",
    "check_jvp",
    "check_vjp",
    "directional_derivative",
    "numerical_jacobian",
]


# --------------------------------------------------------------------------------------------
# Directions and their products
# --------------------------------------------------------------------------------------------


def _vdot(a: Tree, b: Tree) -> float:
    return float(np.dot(_flat64(a), _flat64(b)))


def _norm(tree: Tree) -> float:
    return float(np.linalg.norm(_flat64(tree)))


def _leaf_names(inputs: Tree) -> list[str]:
    names: list[str] = []

    def walk(node: Tree, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}[{k!r}]" if prefix else str(k))
        elif isinstance(node, (tuple, list)):
            for i, v in enumerate(node):
                walk(v, f"{prefix}[{i}]")
        else:
            names.append(prefix or "x")

    walk(inputs, "")
    return names


def _random_direction(
    inputs: Tree, mask: list[bool], rng: np.random.Generator, scale: Any, only: int | None = None
) -> Tree:
    """A Gaussian direction, each perturbed leaf scaled by its RMS (or by ``scale``)."""
    out = []
    for i, (leaf, on) in enumerate(zip(_leaves(inputs), mask, strict=True)):
        if not on or (only is not None and i != only):
            out.append(None if not _is_float(leaf) else np.zeros(leaf.shape))
            continue
        x = np.asarray(leaf, dtype=np.float64)
        if scale is None:
            s = float(np.sqrt(np.mean(x * x))) if x.size else 1.0
            s = s if s > 0 and math.isfinite(s) else 1.0
        else:
            s = float(scale)
        out.append(rng.standard_normal(x.shape) * s)
    return _rebuild(inputs, out)


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


@dataclass
class DirectionCheck:
    """One direction of a check: the analytic and numerical values and the verdict."""

    index: int
    analytic: float
    numerical: float
    error_estimate: float
    tolerance: float
    scale: float
    passed: bool
    reliable: bool = True

    @property
    def difference(self) -> float:
        return abs(self.analytic - self.numerical)

    @property
    def relative_error(self) -> float:
        return self.difference / self.scale if self.scale > 0 else self.difference


@dataclass
class GradcheckResult:
    """Outcome of a check; truthy when it passed.  ``nfev`` counts evaluations of ``f``."""

    check: str
    passed: bool
    directions: list[DirectionCheck] = field(default_factory=list)
    nfev: int = 0
    message: str = ""
    culprits: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def max_relative_error(self) -> float:
        return max((d.relative_error for d in self.directions), default=0.0)


class GradcheckError(AssertionError):
    """A derivative check failed; ``.result`` holds the details."""

    def __init__(self, result: GradcheckResult):
        super().__init__(result.message)
        self.result = result


def _default_rtol(inputs: Tree, mask: list[bool]) -> float:
    """10 sqrt(u) of the coarsest perturbed leaf: 1.5e-7 for float64, 2.4e-3 for float32."""
    us = [_unit_roundoff(leaf.dtype) for leaf, on in zip(_leaves(inputs), mask, strict=True) if on]
    return 10.0 * math.sqrt(max(us, default=2.0**-53))


def _finish(result: GradcheckResult, raise_on_failure: bool) -> GradcheckResult:
    if not result.passed and raise_on_failure:
        raise GradcheckError(result)
    return result


def _compare(
    index: int, analytic: float, numerical: Derivative, scale: float, rtol: float, atol: float
) -> DirectionCheck:
    err = float(numerical.error[0]) if numerical.error.size else 0.0
    tol = atol + rtol * scale
    reliable = err <= tol
    diff = abs(analytic - float(numerical.value[0]))
    return DirectionCheck(
        index=index,
        analytic=analytic,
        numerical=float(numerical.value[0]),
        error_estimate=err,
        tolerance=tol,
        scale=scale,
        passed=reliable and diff <= tol + err,
        reliable=reliable,
    )


def _describe(check: DirectionCheck, total: int, analytic_what: str, numeric_what: str) -> str:
    if not check.reliable:
        return (
            f"direction {check.index} of {total}: the numerical side is not accurate enough to "
            f"judge (error estimate {check.error_estimate:.3g} > tolerance {check.tolerance:.3g}); "
            "pass a smaller step= or scale=, or check the function is smooth here"
        )
    return (
        f"direction {check.index} of {total}:\n"
        f"  analytic  {analytic_what} = {check.analytic:.17g}\n"
        f"  numerical {numeric_what} = {check.numerical:.17g} "
        f"(error estimate {check.error_estimate:.3g})\n"
        f"  |difference| = {check.difference:.3g}, relative {check.relative_error:.3g} "
        f"> tolerance {check.tolerance:.3g}"
    )


def check_vjp(
    f: Callable[[Tree], Tree],
    vjp: Callable[[Tree, Tree], Tree],
    inputs: Tree,
    *,
    cotangent: Tree | None = None,
    directions: int = 3,
    rtol: float | None = None,
    atol: float = 0.0,
    step: float = 0.1,
    scale: float | None = None,
    wrt: Sequence[str] | None = None,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> GradcheckResult:
    """Check ``vjp(x, u)`` (J^T u, same tree as ``inputs``) against finite differences of ``f``.

    For each of ``directions`` Gaussian directions v (seeded), compare
    ``<vjp(x, u), v>`` (analytic) with ``d/dt <u, f(x + t v)>`` (numerical, extrapolated) within
    ``atol + rtol * ||J^T u|| ||v||``.  ``u`` is ``cotangent`` or a Gaussian tree shaped like
    ``f(x)``.  Leaves not perturbed (``wrt``) contribute nothing to ``<vjp, v>``.
    On failure the check is repeated one input leaf at a time to name the culprits.
    """
    rng = np.random.default_rng(seed)
    mask = _mask(inputs, wrt)
    rtol = _default_rtol(inputs, mask) if rtol is None else rtol
    floor = _min_step(inputs, mask)
    y0 = f(inputs)
    nfev = 1
    if cotangent is None:
        u = _rebuild(
            y0,
            [None if leaf is None else rng.standard_normal(np.shape(leaf)) for leaf in _leaves(y0)],
        )
    else:
        u = cotangent
    u_flat = _flat64(u)
    if u_flat.size != _flat64(y0).size:
        raise ValueError(
            f"check_vjp: cotangent has {u_flat.size} elements but f(inputs) has {_flat64(y0).size}"
        )
    g = vjp(inputs, u)
    g_masked = _rebuild(
        inputs,
        [
            np.asarray(gl, dtype=np.float64) if on and gl is not None else None
            for gl, on in zip(_leaves(g), mask, strict=True)
        ],
    )

    def phi(x: Tree) -> np.ndarray:
        return np.array([float(np.dot(u_flat, _flat64(f(x))))])

    def one(direction: Tree, index: int) -> DirectionCheck:
        nonlocal nfev
        analytic = _vdot(g_masked, direction)
        num = directional_derivative(phi, inputs, direction, step=step, min_step=floor)
        nfev += num.nfev
        scale_ = _norm(g_masked) * _norm(direction)
        return _compare(index, analytic, num, scale_, rtol, atol)

    checks = [one(_random_direction(inputs, mask, rng, scale), k + 1) for k in range(directions)]
    result = GradcheckResult("check_vjp", all(c.passed for c in checks), checks, nfev)
    if not result.passed:
        names = _leaf_names(inputs)
        for i, on in enumerate(mask):
            if on and not one(_random_direction(inputs, mask, rng, scale, only=i), 0).passed:
                result.culprits.append(names[i])
        failed = [c for c in checks if not c.passed]
        result.message = "check_vjp failed: the VJP disagrees with finite differences of f.\n" + "\n".join(
            _describe(c, directions, "<vjp(x, u), v>", "d/dt <u, f(x + t v)>") for c in failed
        )
        if result.culprits:
            result.message += "\n  inputs whose gradient is wrong: " + ", ".join(result.culprits)
        result.message += f"\n  ({nfev} evaluations of f; seed {seed}; rtol {rtol:.3g}, atol {atol:.3g})"
    return _finish(result, raise_on_failure)


def check_jvp(
    f: Callable[[Tree], Tree],
    jvp: Callable[[Tree, Tree], Tree],
    inputs: Tree,
    *,
    directions: int = 2,
    step: float = 0.5,
    halvings: int = 12,
    min_order: float = 1.8,
    scale: float | None = None,
    wrt: Sequence[str] | None = None,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> GradcheckResult:
    """Taylor-remainder test of ``jvp(x, v)`` (J v, shaped like ``f(x)``).

    With ``h_k = step / 2**k`` the remainder ``r_k = ||f(x + h_k v) - f(x) - h_k J v||`` is O(h²)
    for the true JVP and only O(h) for a wrong one.  The observed order log2(r_k / r_{k+1}) is read
    at the smallest h whose remainder is still 100× above the rounding floor of ``f`` (so no step
    needs tuning) and must reach ``min_order``.  A remainder that stays at the rounding floor for
    every h (f affine, JVP exact) passes.
    """
    rng = np.random.default_rng(seed)
    mask = _mask(inputs, wrt)
    y0 = _flat64(f(inputs))
    nfev = 1
    u = max((_unit_roundoff(leaf.dtype) for leaf in _leaves(inputs) if _is_float(leaf)), default=2.0**-53)
    checks, details = [], []
    for k in range(directions):
        v = _random_direction(inputs, mask, rng, scale)
        jv = _flat64(jvp(inputs, v))
        hs = [step / 2.0**i for i in range(halvings)]
        ys = [_flat64(f(_perturb(inputs, h, v))) for h in hs]
        nfev += len(hs)
        r = [float(np.linalg.norm(y - y0 - h * jv)) for h, y in zip(hs, ys, strict=True)]
        # Rounding floor of the remainder: a few thousand ulps of the largest output norm.
        noise = 1e3 * u * max([float(np.linalg.norm(y)) for y in [y0, *ys]] + [1e-300])
        orders = [
            (math.log2(r[i] / r[i + 1]), hs[i + 1])
            for i in range(len(r) - 1)
            if r[i + 1] > noise and r[i] > 0
        ]
        if orders:
            order, h_at = orders[-1]
            passed = order >= min_order
        else:
            order, h_at = float("inf"), hs[0]
            passed = all(x <= noise for x in r[1:])
        checks.append(
            DirectionCheck(k + 1, order, 2.0, 0.0, min_order, 1.0, passed)
        )
        if not passed:
            details.append(
                f"direction {k + 1} of {directions}: the Taylor remainder "
                f"||f(x+hv) - f(x) - h·jvp(x, v)|| (jvp analytic, f evaluated) shrinks at order "
                f"{order:.2f} near h = {h_at:.3g}, expected 2 (>= {min_order}); "
                f"remainders {', '.join(f'{x:.2e}' for x in r)}"
            )
    result = GradcheckResult("check_jvp", all(c.passed for c in checks), checks, nfev)
    if not result.passed:
        result.message = "check_jvp failed: the JVP is not the derivative of f.\n" + "\n".join(details)
    return _finish(result, raise_on_failure)


def check_hvp(
    grad: Callable[[Tree], Tree],
    inputs: Tree,
    hvp: Callable[[Tree, Tree], Tree] | None = None,
    *,
    directions: int = 2,
    rtol: float | None = None,
    atol: float = 0.0,
    step: float = 0.1,
    scale: float | None = None,
    wrt: Sequence[str] | None = None,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> GradcheckResult:
    """Second-order check of a gradient function ``grad(x)`` (tree like ``inputs``).

    With ``hvp(x, v)``: ``<w, hvp(x, v)>`` (analytic) against ``d/dt <w, grad(x + t v)>``
    (numerical).  Without it: symmetric consistency, ``d/dt <w, grad(x + t v)>`` against
    ``d/dt <v, grad(x + t w)>`` — equal for every true gradient (the Hessian is symmetric), so a
    hand-written VJP used as ``grad(x) = vjp(x, u)`` is checked without any second derivative.
    """
    rng = np.random.default_rng(seed)
    mask = _mask(inputs, wrt)
    rtol = _default_rtol(inputs, mask) if rtol is None else rtol
    floor = _min_step(inputs, mask)
    nfev = 0
    checks = []
    names = []

    def _masked(tree: Tree) -> list[Any]:
        # Laid out as _random_direction lays out w and v: float64 where perturbed, zeros for a
        # float leaf that is not, None (skipped by _flat64) for an integer or boolean input.
        return [
            np.asarray(g_, dtype=np.float64) if on else (np.zeros(np.shape(g_)) if _is_float(leaf) else None)
            for g_, leaf, on in zip(_leaves(tree), _leaves(inputs), mask, strict=True)
        ]

    def projected(w: Tree) -> Callable[[Tree], np.ndarray]:
        w_flat = _flat64(w)

        def fn(x: Tree) -> np.ndarray:
            return np.array([float(np.dot(w_flat, _flat64(_masked(grad(x)))))])

        return fn

    for k in range(directions):
        v = _random_direction(inputs, mask, rng, scale)
        w = _random_direction(inputs, mask, rng, scale)
        d_wv = directional_derivative(projected(w), inputs, v, step=step, min_step=floor)
        nfev += d_wv.nfev
        if hvp is not None:
            hv = hvp(inputs, v)
            analytic = _vdot(w, _rebuild(inputs, _masked(hv)))
            scale_ = _norm(w) * _norm(hv)
            checks.append(_compare(k + 1, analytic, d_wv, scale_, rtol, atol))
            names.append(("<w, hvp(x, v)>", "d/dt <w, grad(x + t v)>"))
        else:
            d_vw = directional_derivative(projected(v), inputs, w, step=step, min_step=floor)
            nfev += d_vw.nfev
            scale_ = max(abs(float(d_wv.value[0])), abs(float(d_vw.value[0])), 1e-300)
            check = _compare(k + 1, float(d_vw.value[0]), d_wv, scale_, rtol, atol)
            check.error_estimate += float(d_vw.error[0])
            check.reliable = check.error_estimate <= check.tolerance
            check.passed = check.reliable and check.difference <= check.tolerance + check.error_estimate
            checks.append(check)
            names.append(("d/dt <v, grad(x + t w)>", "d/dt <w, grad(x + t v)>"))
    result = GradcheckResult("check_hvp", all(c.passed for c in checks), checks, nfev)
    if not result.passed:
        kind = "the HVP disagrees with finite differences of grad" if hvp else (
            "grad is not a gradient field (its finite-difference Hessian is not symmetric)")
        result.message = f"check_hvp failed: {kind}.\n" + "\n".join(
            _describe(c, directions, a, n) for c, (a, n) in zip(checks, names, strict=True) if not c.passed
        )
    return _finish(result, raise_on_failure)
