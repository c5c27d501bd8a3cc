"""The error model: how far a framework may be from the oracle, derived rather than tuned.

Setting.  The framework computes in ``dtype`` (unit roundoff u) from inputs already rounded to
``dtype``; the oracle computes in float64, more accurately than anything it judges, from exactly
those values.  Input rounding is therefore not counted.

Model (backward stability).  A good implementation returns the exact result for slightly
perturbed inputs, rounded once to the output dtype:

    y_hat = f(a + da) (1 + d),   |da_j| <= g(n) u |a_j|,   |d| <= u

with g(n) the growth of rounding errors in the implementation's reductions over n terms (n for a
naive running sum, log2 n pairwise; we take sqrt(n), the typical growth of n independently rounded
terms — Higham, *Accuracy and Stability of Numerical Algorithms*, §4.2).  To first order
``|y_hat - y| <= g(n) u |J| |a| + u |y|``: the conditioning of *this case* enters through the
componentwise sensitivity ``|J| |a|``, which is what makes "mean 1e8, std 1e-3" hard (|mu|/sigma =
1e11) without any op-specific algebra.

Estimating the sensitivity.  For each array a_k the computation reads (inputs, state, and the
cotangents of a VJP) separately, ``s_k = max_e |f(a_k + e |a_k| r_k) - f(a_k)| / e`` along a
seeded Gaussian direction r_k with relative steps e in {2^-20, 2^-44}, evaluated by the oracle; then
``s = sum_k s_k``.  Probing the arrays one at a time keeps their contributions from cancelling
(the gradient of a standardizer is linear in both dy and gamma: a joint random perturbation can
cancel the two exactly).  Gaussian rather than +-1 directions because a sign vector that is
constant over a small reduction (all six values of an instance) moves the data without changing
its spread and reads a zero sensitivity; an element that one direction happens to move little is
covered by the RMS floor below.  Random directions give the typical
size of |J||a| (the worst case differs by a factor that g(n) = sqrt(n) covers).  The step 2^-44
keeps the first-order regime when it is narrow (|mean|/std = 1e11 needs e << 1e-11; a
standardizer saturates outside it), the step 2^-20 stays above the oracle's own rounding noise;
the larger estimate is kept.

Half precision.  float16 and bfloat16 are storage types: frameworks accumulate them in float32
("opmath").  So the accumulation term uses u_acc = u(float32) and the rounding to the half type
u_out = u(half).  Some kernels also keep intermediate statistics in the half type (PyTorch's CPU
kernels save mean and 1/std in float16), which is as if the inputs were rounded once more: a term
u_out * s.  A half-precision computation without upcast accumulates u(half) errors over its
reductions, sqrt(n) times more, and fails on any reduction of realistic length.  For float32
and float64 u_acc = u_out = the dtype's u and the u_out * s term is dropped (it is below the
accumulation term).

Same-algorithm baseline.  s measures the function, not the algorithm: a quantity that is exactly
0 but is computed as the difference of two O(1) terms (the VJP of w = g sign(v)), or an element
dominated by one badly rounded term, errs by more than |J||a| predicts.  The runner therefore also
evaluates the oracle's own formulas in float32 (the ``numpy32`` adapter; for half types with
float32 opmath and one final rounding) on the same values, and takes its error, scaled from
u(float32) to u_acc of the dtype under test (exact for float32; 2^-29 for float64, where it
estimates what the same algorithm errs by in float64 — this also covers the oracle's own float64
rounding), as a second estimate.  The bound for element i of a compared quantity is

    bound_i = K * max(u_acc * sqrt(n) * s_i + u_out * (|y_i| + [half] s_i),  baseline_error_i) + tiny

with K = 4, n the size of the largest input and ``tiny`` the dtype's smallest normal (so exact
zeros do not demand exact zeros).  K is the safety factor for the estimate of s and for the
constant in g(n); it is the same for every op and dtype, never tuned per case.

Shared terms.  A reduction's rounding error (a mean, a norm, a sum of dy * x_hat) enters every
element that uses it, so an element whose own sensitivity is small (a value near 0 among values
spread over twelve decades) still carries the typical absolute error of its quantity.  s_i is
therefore floored at the RMS of s over the quantity: elementwise where elements are large,
normwise where they are small.  A quantity that is exactly zero with zero sensitivity (a
structural zero) is judged against K u_out times the largest magnitude the step computes
(:func:`structural_zero_floor`).

Verdict of one quantity.  ratio = max_i |actual_i - oracle_i| / bound_i, ok when ratio <= 1.
When the bound is at least a quarter of the quantity's magnitude, the dtype cannot resolve this
case (fewer than two correct bits are guaranteed) and the comparison is MISTRUSTED, not PASS.
NaN or inf from the adapter where the oracle is finite is an ERROR; non-finite oracle values
(the case's own inputs overflow the dtype) are MISTRUSTED; with deliberately non-finite inputs
(the ``nonfinite`` family) NaN/inf must appear exactly where the oracle has them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "K",
    "RELATIVE_STEPS",
    "UNIT_ROUNDOFF",
    "Comparison",
    "bound",
    "compare",
    "sensitivity",
]

UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}
SMALLEST_NORMAL = {
    "float64": 2.0**-1022,
    "float32": 2.0**-126,
    "float16": 2.0**-14,
    "bfloat16": 2.0**-126,
}
MAX_FINITE = {
    "float64": float(np.finfo(np.float64).max),
    "float32": float(np.finfo(np.float32).max),
    "float16": float(np.finfo(np.float16).max),
    "bfloat16": 3.3895313892515355e38,
}
K = 4.0
RELATIVE_STEPS = (2.0**-20, 2.0**-44)
PROBES = 1
MISTRUST_FRACTION = 0.25


def sensitivity(
    evaluate: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    arrays: dict[str, np.ndarray],
    *,
    seed: int = 0,
    center: dict[str, np.ndarray] | None = None,
    groups: dict[str, str | None] | None = None,
    directions: str = "gaussian",
) -> dict[str, np.ndarray]:
    """Per-element first-order change of each quantity under relative perturbations of ``arrays``.

    ``evaluate`` maps float64 arrays to a flat dict of float64 quantities (the oracle);
    ``center`` is ``evaluate(arrays)`` if already known.  ``groups`` (optional) maps an array's
    name to a probe group: the arrays of one group are perturbed together (each along its own
    direction), ``None`` marks an exact array (a step count) that is never perturbed; without it
    every array is its own group.  ``directions="sign"`` moves every element by exactly
    ``e |a_i|`` with a random sign (for an elementwise map this reads ``|J_ii| |a_i|`` exactly: the
    optimizers); the default Gaussian directions suit reductions (see the module docstring).
    """
    rng = np.random.default_rng([seed, 0x5E45])
    center = evaluate(arrays) if center is None else center
    total = {key: np.zeros(np.shape(v)) for key, v in center.items()}
    for members in _probe_groups(arrays, groups):
        best = {key: np.zeros(np.shape(v)) for key, v in center.items()}
        for _, e in itertools.product(range(PROBES), RELATIVE_STEPS):
            with np.errstate(invalid="ignore", over="ignore"):  # inf inputs: inf - inf is judged
                moved_inputs = {name: arrays[name] + e * np.abs(arrays[name])
                                * _direction(rng, np.shape(arrays[name]), directions) for name in members}
            moved = evaluate({**arrays, **moved_inputs})
            for key, base in center.items():
                with np.errstate(invalid="ignore", over="ignore"):
                    s = np.abs(np.asarray(moved[key]) - np.asarray(base)) / e
                best[key] = np.maximum(best[key], np.where(np.isfinite(s), s, 0.0))
        for key in total:
            total[key] = total[key] + best[key]
    return total


def _direction(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    if kind == "sign":
        return rng.choice(np.array([-1.0, 1.0]), size=shape)
    return rng.standard_normal(shape)


def _probe_groups(arrays: dict[str, np.ndarray], groups: dict[str, str | None] | None) -> list[list[str]]:
    if groups is None:
        return [[name] for name in arrays]
    found: dict[str, list[str]] = {}
    for name in arrays:
        group = groups.get(name, name)
        if group is not None:
            found.setdefault(group, []).append(name)
    return list(found.values())


def bound(
    oracle_value: np.ndarray,
    sens: np.ndarray,
    dtype: str,
    n: int,
    baseline_error: np.ndarray | None = None,
    *,
    rms_floor: bool = True,
) -> np.ndarray:
    """The per-element bound of the module docstring.

    ``baseline_error``: |float32 evaluation of the same formulas - oracle| (unscaled).
    ``rms_floor=False`` drops the shared-term floor, for maps that are elementwise (or per
    tensor) by construction and whose sensitivities were read along sign directions: there an
    element's sensitivity is exact, and the floor would lend a tiny second moment the error of
    its largest neighbour (which 1/sqrt(v) then magnifies on the next step).
    """
    u_out = UNIT_ROUNDOFF[dtype]
    u_acc = min(u_out, UNIT_ROUNDOFF["float32"])
    half = u_out > UNIT_ROUNDOFF["float32"]
    if rms_floor:
        sens = np.maximum(sens, _rms(sens))  # shared intermediate terms spread their error: above
    derived = u_acc * math.sqrt(max(n, 1)) * sens + u_out * (np.abs(oracle_value) + (sens if half else 0.0))
    if baseline_error is not None and np.shape(baseline_error) == np.shape(oracle_value):
        scaled = np.asarray(baseline_error, dtype=np.float64) * (u_acc / UNIT_ROUNDOFF["float32"])
        derived = np.maximum(derived, np.where(np.isfinite(scaled), scaled, 0.0))
    return K * derived + SMALLEST_NORMAL[dtype]


def _rms(values: np.ndarray) -> float:
    """Root mean square, scaled by the largest magnitude so 1e200 does not overflow its square."""
    values = np.abs(np.asarray(values, dtype=np.float64))
    big = float(np.max(values)) if values.size else 0.0
    if big == 0.0 or not math.isfinite(big):
        return big if values.size else 0.0
    return big * float(np.sqrt(np.mean((values / big) ** 2)))


def structural_zero_floor(dtype: str, scale: float) -> float:
    """Bound for a quantity whose exact value and sensitivity are identically zero.

    Such a value (the VJP of w = g sign(v), say) is computed as the difference of terms of the
    case's own magnitude, which cancel exactly only in exact arithmetic: a relative bound would
    demand exact zeros.  It is judged against K u_out times the largest magnitude in the step.
    """
    return K * UNIT_ROUNDOFF[dtype] * scale + SMALLEST_NORMAL[dtype]


@dataclass
class Comparison:
    """One compared quantity (e.g. ``outputs.y``, ``grads.x``, ``state.running_var``)."""

    quantity: str
    status: str  # "ok" | "fail" | "mistrusted" | "error"
    ratio: float
    max_abs_error: float
    max_rel_error: float
    bound_at_worst: float
    worst_index: tuple[int, ...]
    note: str = ""

    def describe(self) -> str:
        text = (
            f"{self.quantity}: max |err| {self.max_abs_error:.3g} (rel {self.max_rel_error:.3g}), "
            f"bound {self.bound_at_worst:.3g} at {self.worst_index}, ratio {self.ratio:.3g}"
        )
        return text + (f" — {self.note}" if self.note else "")


def compare(
    quantity: str, actual: np.ndarray, oracle: np.ndarray, bounds: np.ndarray, dtype: str = "float64"
) -> Comparison:
    """Compare one quantity elementwise against its bounds (``dtype``: the dtype under test)."""
    actual = np.asarray(actual, dtype=np.float64)
    oracle = np.asarray(oracle, dtype=np.float64)
    if actual.shape != oracle.shape:
        return Comparison(quantity, "error", math.inf, math.inf, math.inf, 0.0, (),
                          f"shape {actual.shape}, expected {oracle.shape}")
    if oracle.size == 0:
        return Comparison(quantity, "ok", 0.0, 0.0, 0.0, 0.0, ())
    oracle_finite = np.isfinite(oracle)
    if not np.all(oracle_finite):
        # Non-finite inputs: NaN/inf must appear exactly where the oracle has them (the reduction
        # groups the bad value reaches); the finite elements are judged as usual.
        wrong = np.isfinite(actual) != oracle_finite
        if np.any(wrong):
            index = tuple(int(i) for i in np.argwhere(wrong)[0])
            return Comparison(quantity, "fail", math.inf, math.inf, math.inf, 0.0, index,
                              f"non-finite pattern differs: the adapter has {actual[index]} where "
                              f"the oracle has {oracle[index]}")
        if not np.any(oracle_finite):
            return Comparison(quantity, "ok", 0.0, 0.0, 0.0, 0.0, (),
                              "non-finite exactly where the oracle is")
        inner = compare(quantity, actual[oracle_finite], oracle[oracle_finite],
                        np.broadcast_to(bounds, oracle.shape)[oracle_finite], dtype)
        inner.note = (inner.note + "; " if inner.note else "") + "non-finite where the oracle is"
        return inner
    if float(np.max(np.abs(oracle))) > MAX_FINITE[dtype]:
        return Comparison(quantity, "mistrusted", math.nan, math.nan, math.nan, math.nan, (),
                          f"the exact result exceeds the largest finite {dtype}")
    if not np.all(np.isfinite(actual)):
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(actual))[0])
        return Comparison(quantity, "error", math.inf, math.inf, math.inf, 0.0, index,
                          f"the adapter returned {actual[index]} where the oracle is {oracle[index]:.6g}")
    err = np.abs(actual - oracle)
    with np.errstate(over="ignore"):
        ratios = err / bounds
    flat = int(np.argmax(ratios))
    index = tuple(int(i) for i in np.unravel_index(flat, oracle.shape))
    scale = float(np.max(np.abs(oracle)))
    rel = float(np.max(err)) / scale if scale > 0 else float(np.max(err))
    comp = Comparison(quantity, "ok", float(ratios.flat[flat]), float(np.max(err)), rel,
                      float(bounds.flat[flat]), index)
    if comp.ratio > 1.0:
        comp.status = "fail"
    elif scale > 0 and float(np.max(bounds)) >= MISTRUST_FRACTION * scale:
        comp.status = "mistrusted"
        comp.note = "the bound exceeds a quarter of the magnitude: this dtype cannot resolve the case"
    return comp
