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

Estimating the sensitivity.  ``s_i = max_r |f(a + e |a| r) - f(a - e |a| r)|_i / (2e)`` over a few
random sign vectors r (seeded) and several relative steps e in {2^-14, 2^-27, 2^-40}, evaluated by the
oracle itself.  Random signs give the typical size of |J||a| (the worst case differs by a factor
that g(n) = sqrt(n) covers); several steps make the estimate robust when the first-order regime is
narrow (cancellation): outside it a standardizer saturates, so the largest estimate is kept.
Every array the computation reads is perturbed: inputs, state and the cotangents of a VJP.

Half precision.  float16 and bfloat16 are storage types: every framework accumulates them in
float32 ("opmath") and rounds results to the half type.  So the accumulation term uses
u_acc = u(float32) and only the final rounding uses u_out = u(half); for float32 and float64 both
are the dtype's own u.  A half-precision computation without upcast errs by about u(half)/u(float32)
= 8192 times the accumulation term and fails.

Same-precision baseline.  The sensitivity s is a typical, not a worst-case, size of |J||a|; on
cases whose error is dominated by one badly rounded term the two can differ by more than K.  The
runner therefore also evaluates the oracle's own formulas in the test dtype (the ``numpy32``
adapter: the same algorithm in the same precision) and the bound takes K times its error where that
is larger.  The bound for element i of a compared quantity is then

    bound_i = max(K * (u_acc * sqrt(n) * s_i + u_out * |y_i|) + tiny,  K * |baseline_i - y_i|)

with K = 4, n the size of the largest input and ``tiny`` the dtype's smallest normal (so exact
zeros do not demand exact zeros).  K is the safety factor for the estimate of s and for the
constant in g(n); it is the same for every op and dtype, never tuned per case.

Verdict of one quantity.  ratio = max_i |actual_i - oracle_i| / bound_i, ok when ratio <= 1.
When the bound is at least a quarter of the quantity's magnitude, the dtype cannot resolve this
case (fewer than two correct bits are guaranteed) and the comparison is MISTRUSTED, not PASS.
NaN or inf from the adapter where the oracle is finite is an ERROR; non-finite oracle values
(inputs that overflow the dtype) are MISTRUSTED.
"""

from __future__ import annotations

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
RELATIVE_STEPS = (2.0**-14, 2.0**-27, 2.0**-40)
MISTRUST_FRACTION = 0.25


def sensitivity(
    evaluate: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    arrays: dict[str, np.ndarray],
    *,
    probes: int = 2,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per-element first-order change of each quantity under relative perturbations of ``arrays``.

    ``evaluate`` maps float64 arrays to a flat dict of float64 quantities (the oracle).
    """
    rng = np.random.default_rng([seed, 0x5E45])
    best: dict[str, np.ndarray] = {}
    for _ in range(probes):
        signs = {k: rng.choice([-1.0, 1.0], size=np.shape(v)) for k, v in arrays.items()}
        for e in RELATIVE_STEPS:
            plus = evaluate({k: v + e * np.abs(v) * signs[k] for k, v in arrays.items()})
            minus = evaluate({k: v - e * np.abs(v) * signs[k] for k, v in arrays.items()})
            for key in plus:
                with np.errstate(invalid="ignore", over="ignore"):
                    s = np.abs(np.asarray(plus[key]) - np.asarray(minus[key])) / (2.0 * e)
                s = np.where(np.isfinite(s), s, 0.0)
                best[key] = s if key not in best else np.maximum(best[key], s)
    return best


def bound(
    oracle_value: np.ndarray,
    sens: np.ndarray,
    dtype: str,
    n: int,
    baseline: np.ndarray | None = None,
) -> np.ndarray:
    """The per-element bound of the module docstring (``baseline``: the same-precision result)."""
    u_out = UNIT_ROUNDOFF[dtype]
    u_acc = min(u_out, UNIT_ROUNDOFF["float32"])
    derived = K * (u_acc * math.sqrt(max(n, 1)) * sens + u_out * np.abs(oracle_value))
    derived = derived + SMALLEST_NORMAL[dtype]
    if baseline is None:
        return derived
    baseline = np.asarray(baseline, dtype=np.float64)
    if baseline.shape != np.shape(oracle_value):
        return derived
    with np.errstate(invalid="ignore"):
        base_err = K * np.abs(baseline - oracle_value)
    return np.maximum(derived, np.where(np.isfinite(base_err), base_err, 0.0))


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
        return Comparison(quantity, "mistrusted", math.nan, math.nan, math.nan, math.nan, (),
                          "the oracle is not finite here (inputs overflow this dtype)")
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
