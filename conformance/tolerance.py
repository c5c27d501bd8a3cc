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

One probe reads |sum_j c_j r_j|, a draw of |N(0, sum c_j^2)|: below a tenth of its typical size
with probability 8%.  For a quantity of many elements the RMS floor below averages that away; a
scalar (spectral norm's sigma) or a two-element vector has nothing to average over, and single
probes under-read sigma's sensitivity 40-250 times in a few seeds of 200.  So every quantity is
read by at least ``PROBED_ELEMENTS`` = 4 draws: ``ceil(4 / size)`` probes per step, combined as
their root mean square (below a fortieth of the typical size with probability ~1e-6, a chi
distribution with 4 degrees of freedom), which estimates the same typical size as one probe
without its heavy lower tail.  Sign directions (the optimizers: an elementwise step reads
|J_ii||a_i| exactly) are also moved the other way at the first step, since a kink or a jump (a
sign, a maximum, a clip) may sit on one side only.

Half precision.  float16 and bfloat16 are storage types: frameworks accumulate them in float32
("opmath").  So the accumulation term uses u_acc = u(float32) and the rounding to the half type
u_out = u(half), plus a term u_out * s for intermediate results rounded to the half type.  A
half-precision computation without upcast accumulates u(half) errors over its reductions, sqrt(n)
times more, and fails on any reduction of realistic length.  For float32
and float64 u_acc = u_out = the dtype's u and the u_out * s term is dropped (it is below the
accumulation term).

Same-algorithm baseline.  s measures the function, not the algorithm: a quantity that is exactly
0 but is computed as the difference of two O(1) terms (the VJP of w = g sign(v)), or an element
dominated by one badly rounded term, errs by more than |J||a| predicts.  The runner therefore also
evaluates the oracle's own formulas in float32 (the ``numpy32`` adapter; for half types with
float32 opmath and one final rounding) on the same values, and takes its error, scaled from
u(float32) to u_acc of the dtype under test (exact for float32; 2^-29 for float64, where it
estimates what the same algorithm errs by in float64), as a second estimate.

Statistics saved in a half type.  PyTorch's CPU kernels compute a float16 or bfloat16
normalization in float32 but save its mean and 1/std in the half type for the backward pass: the
backward's x_hat and prefactor then carry a *coherent* relative error u(half) for a whole
reduction group, which breaks the consistency between x_hat and 1/std.  No perturbation of the
inputs reproduces that (a random direction reads it ~1/sqrt(n) as strongly, and a coherent shift
or scaling of x leaves x_hat invariant), so the random-probe term under-allowed it (torch's
InstanceNorm float16 backward by up to 1.37 in seed sweeps, its bfloat16 LayerNorm on data spanning
twelve decades by 1.18; both match bit for bit a float32 evaluation with mean and 1/std rounded to
the half type).  For a half-precision backward the baseline is therefore evaluated twice, the
second time with the statistics saved in the half type (``reference/normalizers/_stats.py``,
``statistics_saved_in``, set only by the baseline), and the larger error of the two is the
baseline's error: the measured cost of an accepted design, for the case at hand.

The oracle's own error.  What is compared is |actual - oracle| <= |actual - y| + |oracle - y|.
The oracle's error is estimated the same way, by its algorithm's measured float32 error scaled to
float64, and added: negligible below float64, but of the framework's own size when float64 is
under test (spectral norm's power iteration: against 50-digit values the float64 oracle was the
less accurate of the two in most of the seeds where the bound was exceeded).  The bound for
element i of a compared quantity is

    bound_i = K * (max(u_acc sqrt(n) s_i + u_out (|y_i| + [half] s_i),  base_i u_acc / u32)
                   + base_i u64 / u32) + tiny

with base_i = |float32 baseline - oracle|_i, K = 4, n the size of the largest input and ``tiny``
the dtype's smallest normal (so exact zeros do not demand exact zeros).  K is the safety factor
for the estimate of s and for the constant in g(n); it is the same for every op and dtype, never
tuned per case.

Shared terms.  A reduction's rounding error (a mean, a norm, a sum of dy * x_hat) enters every
element that uses it, so an element whose own sensitivity is small (a value near 0 among values
spread over twelve decades) still carries the typical absolute error of its quantity.  s_i is
therefore floored at the RMS of s over the quantity: elementwise where elements are large,
normwise where they are small.  A quantity that is exactly zero with zero sensitivity (a
structural zero) is judged against K u_out times the largest magnitude the step computes, and a
structural zero gradient against K u_out times the size of its terms, |y| |ct| / |a_i|
(:func:`structural_zero_floor`).

Outputs computed from another output.  The model perturbs the inputs once for every output, as
if all were computed from the same slightly wrong inputs.  An output formed from another one is
not: spectral norm's ``w = W / sigma`` divides the *exact* W by a sigma that carries the power
iteration's own rounding, which no perturbation of W reproduces, because the ratio cancels it
(when one element dominates W, ``w_ij = W_ij / sigma`` ~ sign(W_ij) is insensitive to W while
sigma moves 1:1 with it).  Both torch and the oracle form w this way, so w errs relatively by
what sigma errs (torch's float64 ``w`` was off by one common factor of 6e-16, 1.24 times its
bound, with sigma 5.5 u off and within its own bound).  A spec declares such an output
(``scaled_by = "sigma"``) and its bound gains sigma's relative bound, ``|w_i| bound_sigma /
|sigma|`` (:func:`inherited`): a linear first-order term, and sigma itself is judged against
``bound_sigma`` on its own, so a wrong sigma still FAILs there.

Verdict of one quantity.  ratio = max_i |actual_i - oracle_i| / bound_i, ok when ratio <= 1.
When the bound is at least a quarter of the quantity's magnitude, the dtype cannot resolve this
case (fewer than two correct bits are guaranteed) and the comparison is MISTRUSTED, not PASS.
With deliberately non-finite inputs (the ``nonfinite`` family) NaN/inf must appear exactly where
the oracle has them.  Where the exact value, moved by its bound, reaches the dtype's overflow
threshold (``max + ulp/2``), an inf of its sign is the correctly rounded result and the quantity
is MISTRUSTED (the dtype cannot hold it); this is decided per element before any other non-finite
rule, so one legitimate inf does not turn the rest into a pattern mismatch.  NaN or inf from the
adapter where the oracle is finite and in range is an ERROR of kind ``nonfinite``, distinct from
a crash.  A returned array in another dtype than the request's (:func:`check_dtype`) FAILs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from conformance.dtypes import (
    OVERFLOW_THRESHOLD,
    SMALLEST_NORMAL,
    UNIT_ROUNDOFF,
    is_discrete,
    name_of,
    representable,
)

__all__ = [
    "K",
    "RELATIVE_STEPS",
    "Comparison",
    "bound",
    "check_dtype",
    "compare",
    "largest_finite",
    "sensitivity",
]

K = 4.0
RELATIVE_STEPS = (2.0**-20, 2.0**-44)
#: Every quantity's sensitivity is read by at least this many Gaussian draws (:func:`_probe_count`).
PROBED_ELEMENTS = 4
MISTRUST_FRACTION = 0.25


def sensitivity(
    evaluate: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    arrays: dict[str, np.ndarray],
    *,
    seed: int = 0,
    center: dict[str, np.ndarray] | None = None,
    groups: dict[str, str | None] | None = None,
    directions: str = "gaussian",
    counters: Iterable[str] = (),
    still: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Per-element first-order change of each quantity under relative perturbations of ``arrays``.

    ``evaluate`` maps float64 arrays to a flat dict of float64 quantities (the oracle);
    ``center`` is ``evaluate(arrays)`` if already known.  ``groups`` (optional) maps an array's
    name to a probe group: the arrays of one group are perturbed together (each along its own
    direction), ``None`` marks an exact array (a step count) that is never perturbed; without it
    every array is its own group.  ``directions="sign"`` moves every element by exactly
    ``e |a_i|`` with a random sign (for an elementwise map this reads ``|J_ii| |a_i|`` exactly: the
    optimizers); the default Gaussian directions suit reductions (see the module docstring).
    ``still`` (optional): per array, the elements never moved: values next to a jump of the op
    (a bin edge), where a move would read the jump's height over the step instead of the slope;
    the jump is judged by its own rule (conformance/judge.py, ``mistrust_near_jumps``).
    """
    rng = np.random.default_rng([seed, 0x5E45])
    center = evaluate(arrays) if center is None else center
    total = {key: np.zeros(np.shape(v)) for key, v in center.items()}
    probes = _probe_count(center, counters) if directions == "gaussian" else 1
    for members in _probe_groups(arrays, groups):
        best = {key: np.zeros(np.shape(v)) for key, v in center.items()}
        for e in RELATIVE_STEPS:
            drawn = [{name: _direction(rng, np.shape(arrays[name]), directions) for name in members}
                     for _ in range(probes)]
            if directions == "sign" and e == RELATIVE_STEPS[0]:
                # Both sides of every element: a kink or a jump (a sign, a maximum, a clip) may sit
                # on one side only.
                drawn.append({name: -d for name, d in drawn[0].items()})
            reads: dict[str, list[np.ndarray]] = {key: [] for key in center}
            for direction in drawn:
                with np.errstate(invalid="ignore", over="ignore"):  # inf inputs: inf - inf is judged
                    moved_inputs = {name: arrays[name] + e * np.abs(arrays[name]) * direction[name]
                                    * (1.0 if still is None or name not in still else ~still[name])
                                    for name in members}
                moved = evaluate({**arrays, **moved_inputs})
                for key, base in center.items():
                    with np.errstate(invalid="ignore", over="ignore"):
                        s = np.abs(np.asarray(moved[key]) - np.asarray(base)) / e
                    reads[key].append(np.where(np.isfinite(s), s, 0.0))
            for key in best:
                # Gaussian probes: the root mean square over probes (an estimate of the typical
                # change, without a single draw's heavy lower tail); sign probes: the largest.
                estimate = _rms_of(reads[key]) if directions == "gaussian" else np.max(reads[key], axis=0)
                best[key] = np.maximum(best[key], estimate)
        for key in total:
            total[key] = total[key] + best[key]
    return total


def _rms_of(reads: list[np.ndarray]) -> np.ndarray:
    """Elementwise root mean square of equally shaped arrays, without overflowing the squares."""
    if len(reads) == 1:
        return reads[0]
    stacked = np.stack(reads)
    top = np.max(stacked, axis=0)
    safe = np.where(top > 0, top, 1.0)
    return top * np.sqrt(np.mean((stacked / safe) ** 2, axis=0))


def _probe_count(center: dict[str, np.ndarray], counters: Iterable[str] = ()) -> int:
    """Gaussian probes per step: enough that every quantity is read by ``PROBED_ELEMENTS`` draws.

    One probe reads |sum_i c_i r_i|, a |N(0, sum c_i^2)| draw: below a tenth of its typical size
    with probability 8%.  The RMS floor over a quantity's elements averages that away for
    quantities of many elements; a scalar (spectral norm's sigma) or a two-element vector has no
    such average, so it gets ``ceil(PROBED_ELEMENTS / size)`` probes, whose root mean square is
    below a fortieth of the typical size with probability ~1e-6 (chi with 4 degrees of freedom).
    ``counters`` (computed quantities that are exact counts, such as a step count) do not count.
    """
    exact = set(counters)
    sizes = [int(np.size(v)) for k, v in center.items() if np.size(v) and k not in exact]
    return max(1, math.ceil(PROBED_ELEMENTS / min(sizes, default=PROBED_ELEMENTS)))


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
    own = 0.0
    if baseline_error is not None and np.shape(baseline_error) == np.shape(oracle_value):
        measured = np.asarray(baseline_error, dtype=np.float64)
        measured = np.where(np.isfinite(measured), measured, 0.0)
        derived = np.maximum(derived, measured * (u_acc / UNIT_ROUNDOFF["float32"]))
        # The oracle's own float64 error: its algorithm's measured float32 error scaled to float64
        # (negligible unless float64 is under test, where it is of the framework's own size).
        own = measured * (UNIT_ROUNDOFF["float64"] / UNIT_ROUNDOFF["float32"])
    return K * (derived + own) + SMALLEST_NORMAL[dtype]


def _rms(values: np.ndarray) -> float:
    """Root mean square, scaled by the largest magnitude so 1e200 does not overflow its square."""
    values = np.abs(np.asarray(values, dtype=np.float64))
    big = float(np.max(values)) if values.size else 0.0
    if big == 0.0 or not math.isfinite(big):
        return big if values.size else 0.0
    return big * float(np.sqrt(np.mean((values / big) ** 2)))


def largest_finite(arrays: list[Any]) -> float:
    """The largest magnitude over the float arrays that are entirely finite (0 when there is
    none); labels, indices and masks are not magnitudes and are left out."""
    return max([float(np.max(np.abs(v))) for v in arrays
                if np.size(v) and not is_discrete(v) and np.all(np.isfinite(v))] or [0.0])


def inherited(value: Any, scale: Any, scale_bound: Any) -> Any:
    """The error ``value`` inherits from an output it is multiplied or divided by: ``|value|``
    times the relative bound of that output (0 where the scale is 0 or not finite; see the module
    docstring, "Outputs computed from another output")."""
    scale = np.abs(np.asarray(scale, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        relative = np.where((scale > 0) & np.isfinite(scale), np.asarray(scale_bound) / scale, 0.0)
        term = np.abs(np.asarray(value, dtype=np.float64)) * relative
    return np.where(np.isfinite(term), term, 0.0)


def structural_zero_floor(dtype: str, scale: Any) -> Any:
    """Bound for a quantity whose exact value and sensitivity are identically zero.

    Such a value (the VJP of w = g sign(v), say) is computed as the difference of terms, which
    cancel exactly only in exact arithmetic: a relative bound would demand exact zeros.  It is
    judged against K u_out times the size of those terms: the largest magnitude in the step, and
    for a gradient the size of its partial derivatives, |y| |ct| / |a| per element (the terms of
    that VJP are g/|v| ct: torch's float64 WeightNorm gradient of a 7.8e-4 element errs by 2.9e-14,
    42 times K u times the step's largest magnitude, and well within K u g ct / |v|).
    """
    return K * UNIT_ROUNDOFF[dtype] * scale + SMALLEST_NORMAL[dtype]


@dataclass
class Comparison:
    """One compared quantity (e.g. ``outputs.y``, ``grads.x``, ``state.running_var``).

    ``kind`` says what an "error" status is: ``shape`` (wrong shape), ``nonfinite`` (NaN or inf
    where the oracle is finite and in range), ``missing`` (not returned), ``raised`` /
    ``timeout`` (set by the runner); ``dtype`` marks a FAIL for a response of the wrong dtype.
    ``beyond_range`` counts elements whose exact value the dtype cannot hold (or that the adapter
    rounded to inf where the bound admits it).
    """

    quantity: str
    status: str  # "ok" | "fail" | "mistrusted" | "error"
    ratio: float
    max_abs_error: float
    max_rel_error: float
    bound_at_worst: float
    worst_index: tuple[int, ...]
    note: str = ""
    kind: str = ""
    beyond_range: int = 0

    def describe(self) -> str:
        text = (
            f"{self.quantity}: max |err| {self.max_abs_error:.3g} (rel {self.max_rel_error:.3g}), "
            f"bound {self.bound_at_worst:.3g} at {self.worst_index}, ratio {self.ratio:.3g}"
        )
        return text + (f" — {self.note}" if self.note else "")

    def add_note(self, text: str) -> None:
        self.note = f"{self.note}; {text}" if self.note else text


def _index(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def compare(
    quantity: str, actual: np.ndarray, oracle: np.ndarray, bounds: np.ndarray, dtype: str = "float64"
) -> Comparison:
    """Compare one quantity elementwise against its bounds (``dtype``: the dtype under test).

    Elements fall into three sets, judged in this order:

    * the oracle is NaN/inf (the case's inputs are non-finite): the adapter must be non-finite
      there too;
    * the exact value, moved by its bound, reaches the dtype's overflow threshold (it rounds to
      inf): an inf of the same sign, or a finite value within the bound, is correct there, and the
      quantity is MISTRUSTED (the dtype cannot hold the result);
    * every other element: the adapter must be finite (else an error of kind ``nonfinite``) and
      within its bound.
    """
    actual = np.asarray(actual, dtype=np.float64)
    oracle = np.asarray(oracle, dtype=np.float64)
    if actual.shape != oracle.shape:
        return Comparison(quantity, "error", math.inf, math.inf, math.inf, 0.0, (),
                          f"shape {actual.shape}, expected {oracle.shape}", kind="shape")
    if oracle.size == 0:
        return Comparison(quantity, "ok", 0.0, 0.0, 0.0, 0.0, ())
    bounds = np.broadcast_to(np.asarray(bounds, dtype=np.float64), oracle.shape)
    exact_nonfinite = ~np.isfinite(oracle)
    threshold = OVERFLOW_THRESHOLD[dtype]
    with np.errstate(invalid="ignore", over="ignore"):
        # Within its bound, the result may round to inf: an inf is admissible there.
        beyond = ~exact_nonfinite & (np.abs(oracle) + bounds >= threshold)
        # ... and the exact value does exceed the range, or the adapter's did round to inf.
        overflowed = beyond & ((np.abs(oracle) >= threshold) | np.isinf(actual))
    judged = ~exact_nonfinite & ~beyond
    wrong = exact_nonfinite & np.isfinite(actual)
    if np.any(wrong):
        index = _index(wrong)
        return Comparison(quantity, "fail", math.inf, math.inf, math.inf, 0.0, index,
                          f"non-finite pattern differs: the adapter has {actual[index]} where "
                          f"the oracle has {oracle[index]}")
    with np.errstate(invalid="ignore", over="ignore"):
        rounded_up = np.isinf(actual) & (np.sign(actual) == np.sign(oracle))
        within = np.isfinite(actual) & (np.abs(actual - oracle) <= bounds)
    wrong = beyond & ~(rounded_up | within)
    if np.any(wrong):
        index = _index(wrong)
        kind = "nonfinite" if np.isnan(actual[index]) else ""
        return Comparison(quantity, "error" if kind else "fail", math.inf, math.inf, math.inf,
                          float(bounds[index]), index,
                          f"the adapter has {actual[index]} where the exact value {oracle[index]:.6g} "
                          f"exceeds the {dtype} range", kind=kind)
    bad = judged & ~np.isfinite(actual)
    if np.any(bad):
        index = _index(bad)
        return Comparison(quantity, "error", math.inf, math.inf, math.inf, 0.0, index,
                          f"the adapter returned {actual[index]} where the oracle is {oracle[index]:.6g}",
                          kind="nonfinite")
    comp = _judge_finite(quantity, actual, oracle, bounds, judged)
    if np.any(exact_nonfinite):
        comp.add_note("non-finite where the oracle is")
    if np.any(beyond):
        comp.beyond_range = int(np.sum(overflowed))
        if comp.status == "ok":
            comp.status = "mistrusted"
        count = int(np.sum(beyond))
        comp.add_note(f"the result exceeds the largest finite {dtype} ({count} element{'s' * (count > 1)})"
                      if comp.beyond_range else
                      f"within its bound, the result may exceed the largest finite {dtype} "
                      f"({count} element{'s' * (count > 1)})")
    return comp


def _judge_finite(quantity: str, actual: np.ndarray, oracle: np.ndarray, bounds: np.ndarray,
                  judged: np.ndarray) -> Comparison:
    """The ratio of error to bound over the ``judged`` elements (finite on both sides)."""
    if not np.any(judged):
        return Comparison(quantity, "ok", 0.0, 0.0, 0.0, 0.0, ())
    with np.errstate(over="ignore", invalid="ignore"):
        err = np.where(judged, np.abs(actual - oracle), 0.0)
        ratios = np.where(judged, err / bounds, 0.0)
    flat = int(np.argmax(ratios))
    index = tuple(int(i) for i in np.unravel_index(flat, oracle.shape))
    scale = float(np.max(np.abs(oracle[judged])))
    worst = float(np.max(err))
    rel = worst / scale if scale > 0 else worst
    comp = Comparison(quantity, "ok", float(ratios.flat[flat]), worst, rel, float(bounds.flat[flat]), index)
    if comp.ratio > 1.0:
        comp.status = "fail"
    elif scale > 0 and float(np.max(bounds[judged])) >= MISTRUST_FRACTION * scale:
        comp.status = "mistrusted"
        comp.note = "the bound exceeds a quarter of the magnitude: this dtype cannot resolve the case"
    return comp


def check_dtype(comp: Comparison, returned: Any, requested: str) -> Comparison:
    """FAIL a quantity returned in the wrong dtype (the comparison of its values is kept).

    The response rule: an array is in the requested dtype, or in a wider floating dtype holding
    only values of the requested one (NumPy has no native bfloat16, so bfloat16 may come back
    as float32 holding bfloat16 values).  A narrower dtype (float32 for a float64 request) or
    wider values (a float64 result for a float16 request) mean the framework computed or stored
    in another precision than the one it claims.
    """
    got = name_of(returned)
    if got == requested:
        return comp
    if got in UNIT_ROUNDOFF and UNIT_ROUNDOFF[got] < UNIT_ROUNDOFF[requested]:
        if representable(returned, requested):
            return comp
        problem = f"returned {got} values that are not {requested} values for a {requested} request"
    else:
        problem = f"returned dtype {got} for a {requested} request"
    if comp.status != "error":
        comp.status = "fail"
        comp.kind = "dtype"
    comp.note = f"{problem}" + (f"; {comp.note}" if comp.note else "")
    return comp
