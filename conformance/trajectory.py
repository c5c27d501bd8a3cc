"""Trajectory cases: an optimizer or a stream op checked over T steps, as a user runs it.

A case is T steps of an optimizer (its initial parameters, a gradient source, a learning-rate
schedule) or of a stream op (a fresh batch per step), with the case's hyper-parameters; the step
sources are conformance/step_sources.py.  T is ``Profile.trajectory_steps`` (5 quick, 20
default, 200 thorough).

Free-running comparison.  The adapter runs its own trajectory: at step k it receives its own
parameters and state (as it returned them, in its dtype), the gradient (``fixed``: the rounded
sequence; model sources: the exact gradient at its own parameters, rounded to the dtype) and
``lr = lr_0 * schedule(k)``.  The oracle runs the same recipe in float64 from the same rounded
initial values.  After every step the parameters and every state slot are compared.

Accumulated bound.  The error of step k+1 is the rounding error the step itself makes plus the
error already present in its inputs, carried through the step map F_k (parameters, state and,
for model sources, the gradient as a function of the parameters):

    B_{k+1} = b_k + P_k(B_k),      B_0 = 0

b_k is the single-step bound of :mod:`conformance.tolerance` at the oracle's point (sensitivity
of the step to its parameters, gradients and state, each group probed separately along sign
directions, which for an elementwise step reads |J_ii| |a_i| exactly; exact counters are not
perturbed; plus the float32 same-formula baseline).  P_k(B) is the first-order effect of an
error of size B in the step's inputs, measured by :func:`propagate`: each probe group
(parameters, each state slot) moved element by element, rescaled to B, and the groups' effects
combined in quadrature (independent roundings; the worst-case sum |J| B grows geometrically on
a converging oscillation whose actual errors do not).  An EMA forgets old errors (factor beta
per step), a model gradient can amplify them (1 + lr a on the quadratic), a tiny second moment
amplifies them by lr a / sqrt(v): the bound follows the trajectory's own conditioning, never a
tuned factor, and a quantity it can no longer resolve becomes MISTRUSTED.  Without P_k a correct
float32 trajectory exceeds the single-step bounds after a few dozen steps (tested).  Nothing is
re-synchronized, so a wrong step shows at that step and stays visible.

Why a first-order P_k is not enough in half precision, and what judges such a step.  P_k(B) is
J e for a carried error e of size B, measured by moving the inputs by B.  That is exact to first
order when the step map is smooth over the box of size B around the oracle's point, and float32
keeps B small enough for that.  float16 and bfloat16 do not: their carried bounds are 2^-11 and
2^-8 relative per step, and the moments of small gradients sit at the subnormal floor
(a second moment of 4e-8 stored in float16 is 0 or 6e-8).  Inside such a box the step map has
kinks and jumps: AdamP's projection switches on when a cosine crosses delta/sqrt(n) (a jump of
O(1) in the update), Lion's sign(c) flips where c crosses 0, a clip or AMSGrad's maximum changes
branch, and 1/sqrt(v) blows up as v -> 0.  Measured on the same-precision baseline (``numpy32``,
correct by construction) before this was modelled, 20 float16 and bfloat16 trajectories of the
default profile exceeded the bound by 1.04 to 156 times.  Three causes, three remedies:

1. a move of one sign misses a jump on the other side: every group is moved both ways;
2. a second moment moved by -B < -v goes negative and its square root is NaN, which read as "no
   effect"; rounding, underflow and flush-to-zero never change a sign, so a move across zero is
   also evaluated stopped at zero (the underflowed value), and the larger finite effect counts;
3. where the map jumps, no first-order estimate bounds it: a step whose free-running comparison
   exceeds B_{k+1} is judged again from the adapter's *own* inputs (its parameters, the gradient it
   was given, its state) against the exact step map, with the single-step bound b_k measured
   there (:func:`judge_own_step`).  Those inputs are the adapter's, so a wrong step errs there by
   more than one step's rounding and FAILs; a right one agrees, which proves that the distance to
   the float64 trajectory comes from the trajectory's sensitivity, not from the step: that step is
   MISTRUSTED ("the trajectory is more sensitive here than its first-order bound"), and every later
   step is judged the same way, so a later wrong step still FAILs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

import reference
from conformance import judge, tolerance
from conformance.dtypes import round_to, widen
from conformance.step_sources import (
    GRADIENT_FAMILIES,
    SCHEDULES,
    BatchSource,
    GradientSource,
    StepSource,
    optimizer_cases,
    schedule_multipliers,
    source_of,
    tag,
)

__all__ = ["GRADIENT_FAMILIES", "SCHEDULES", "BatchSource", "GradientSource", "OracleStep", "StepSource",
           "iter_oracle_trajectory", "judge_own_step", "judging_bounds", "local_bounds", "optimizer_cases",
           "oracle_trajectory", "propagate", "schedule_multipliers", "source_of", "tag"]

#: A flat float64 evaluation of one step (``in./state.`` -> ``outputs./state.``), and the float32
#: same-formula baseline of a step under given hyper-parameters.
Evaluate = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
Baseline = Callable[[dict[str, Any], dict[str, np.ndarray]], dict[str, np.ndarray]]

@dataclass
class OracleStep:
    """Step k of the oracle's trajectory: what it read, what it computed, and the bounds."""

    hp: dict[str, Any]
    arrays: dict[str, np.ndarray]     # "in.params/p", "in.grads/p", "state.<slot>" (float64)
    expected: dict[str, np.ndarray]   # "outputs.params/p", "state.<slot>"
    bounds: dict[str, np.ndarray]     # accumulated bound B_{k+1}


def _groups(op: reference.Op, arrays: dict[str, np.ndarray]) -> dict[str, str | None]:
    """Probe groups: all parameters, all gradients, each slot; exact slots never perturbed."""
    exact = {s.name for s in op.spec.state if s.exact}
    out: dict[str, str | None] = {}
    for key in arrays:
        if key.startswith("in."):
            out[key] = key[3:].split("/", 1)[0]
        else:
            slot = key[len("state."):].split("/", 1)[0]
            out[key] = None if slot in exact else f"state:{slot}"
    return out


def oracle_trajectory(*args: Any, **kwargs: Any) -> list[OracleStep]:
    """All the steps of :func:`iter_oracle_trajectory` (same arguments)."""
    return list(iter_oracle_trajectory(*args, **kwargs))


def iter_oracle_trajectory(
    op: reference.Op,
    hps: list[dict[str, Any]],
    initial: dict[str, np.ndarray],
    state0: dict[str, np.ndarray],
    source: StepSource,
    dtype: str,
    seed: int,
    baseline: Baseline,
    evaluate_for: Callable[[dict[str, Any]], Evaluate],
    *,
    with_bounds: bool = True,
    bound_dtype: str | None = None,
) -> Iterator[OracleStep]:
    """The float64 trajectory with its accumulated bounds (module docstring), step by step.

    ``initial``: the rounded initial values of the *carried* inputs, in the op's flat form (an
    optimizer's ``params/<path>``; none for a stream op): an output with the name of an input is
    that input at the next step.  ``source.fresh(carried, k)`` gives the other inputs of step k
    (an optimizer's gradients, a stream's batch).  ``state0``: the flat initial state;
    ``hps[k]``: the hyper-parameters of step k; ``baseline(hp, arrays)``: the float32
    same-formula evaluation; ``evaluate_for(hp)``: the oracle's flat evaluation under hp.
    ``with_bounds=False`` computes the values only (a quick first look for the diagnosis);
    ``bound_dtype`` computes the bounds for another dtype than the one the values are rounded to
    (the diagnosis "consistent with float32 arithmetic").
    """
    judged_in = bound_dtype or dtype
    carried_in = dict(initial)
    state = dict(state0)
    carried: dict[str, np.ndarray] = {}
    n = 0
    for k, hp in enumerate(hps):
        fresh = source.fresh(carried_in, k)
        if not source.depends_on_carried:
            fresh = widen(round_to(fresh, dtype))
        arrays = judge.pack({**carried_in, **fresh}, state, None)
        n = n or max(int(np.size(v)) for key, v in arrays.items() if key.startswith("in."))
        evaluate = evaluate_for(hp)
        expected = evaluate(arrays)
        carried_in = {name: expected[f"outputs.{name}"] for name in carried_in}
        state = judge.unpack(expected, "state.")
        if not with_bounds:
            yield OracleStep(hp, arrays, expected, {})
            continue
        groups = _groups(op, arrays)
        local, sens = local_bounds(op, evaluate, arrays, expected, baseline(hp, arrays), judged_in, n,
                                   seed + k)
        if carried:
            step_map = (_with_fresh_inputs(evaluate, source, list(carried_in)) if source.depends_on_carried
                        else evaluate)
            moved = propagate(step_map, arrays, carried, seed=seed + k, center=expected, groups=groups)
            bounds = {key: local[key] + moved[key] for key in expected}
        else:
            bounds = local
        judged = judging_bounds(bounds, expected, sens, arrays, judged_in)
        yield OracleStep(hp, arrays, expected, judged)
        carried = {**{f"in.{name}": bounds[f"outputs.{name}"] for name in carried_in},
                   **{key: b for key, b in bounds.items() if key.startswith("state.")}}


def local_bounds(
    op: reference.Op,
    evaluate: Evaluate,
    arrays: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    base: dict[str, np.ndarray],
    dtype: str,
    n: int,
    seed: int,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """b_k, the single-step bound at ``arrays`` (sensitivity of the step to its parameters,
    gradients and each slot, probed along sign directions per group, exact counters never
    perturbed; and the float32 same-formula baseline ``base``), with the sensitivities."""
    sens = tolerance.sensitivity(evaluate, arrays, seed=seed, center=expected, groups=_groups(op, arrays),
                                 directions="sign")
    local = {}
    for key, value in expected.items():
        b = base.get(key)
        with np.errstate(invalid="ignore", over="ignore"):
            err = None if b is None or np.shape(b) != np.shape(value) else np.abs(
                np.asarray(b, dtype=np.float64) - value)
        local[key] = tolerance.bound(value, sens[key], dtype, n, err, rms_floor=False)
    return local, sens


def judging_bounds(bounds: dict[str, np.ndarray], expected: dict[str, np.ndarray],
                   sens: dict[str, np.ndarray], arrays: dict[str, np.ndarray], dtype: str
                   ) -> dict[str, np.ndarray]:
    """The bounds a step is judged against: a quantity that is exactly 0 with zero sensitivity
    (the moments of a tensor whose gradient is always 0) gets the structural-zero floor.  The
    floor is a judging allowance, not an error estimate, so it is never carried."""
    scale = tolerance.largest_finite([*expected.values(), *arrays.values()])
    return {key: (np.maximum(b, tolerance.structural_zero_floor(dtype, scale))
                  if not np.any(expected[key]) and not np.any(sens[key]) else b)
            for key, b in bounds.items()}


def judge_own_step(
    op: reference.Op,
    hp: dict[str, Any],
    request_arrays: dict[str, np.ndarray],
    actual: dict[str, np.ndarray],
    dtype: str,
    n: int,
    seed: int,
    baseline: Baseline,
    evaluate: Evaluate,
    **judging: Any,
) -> list[tolerance.Comparison]:
    """The adapter's step judged against the exact step map from its *own* inputs
    (``request_arrays``: its parameters, gradients and state, as float64) with the single-step
    bound there: the check of a step whose free-running comparison exceeded its propagated
    bound (module docstring)."""
    expected = evaluate(request_arrays)
    local, sens = local_bounds(op, evaluate, request_arrays, expected, baseline(hp, request_arrays), dtype,
                               n, seed)
    bounds = judging_bounds(local, expected, sens, request_arrays, dtype)
    return judge.judge(actual, expected, bounds, dtype, **judging)


def _element_space(key: str) -> str | None:
    """The parameter path an array lives on: "in.params/conv/w", "state.exp_avg/conv/w" and
    "outputs.params/conv/w" share "conv/w"; global slots ("state.step") have none."""
    body = key.split(".", 1)[1] if "." in key.split("/", 1)[0] else key
    return body.split("/", 1)[1] if "/" in body else None


def propagate(
    evaluate: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    arrays: dict[str, np.ndarray],
    incoming: dict[str, np.ndarray],
    *,
    seed: int = 0,
    center: dict[str, np.ndarray] | None = None,
    groups: dict[str, str | None] | None = None,
    probes: int = 1,
) -> dict[str, np.ndarray]:
    """``|J e|`` for the carried error ``e = B * sign`` of a trajectory step (module docstring).

    Optimizers are elementwise per parameter (or couple a tensor through its norm), so each
    element is moved by its own amount: 2^-20 of its magnitude (a first-order move far above
    float64 rounding, whatever the size of its bound), or its bound itself where that is larger
    (an element already that uncertain is probed at the size of its uncertainty: an exact 0, a
    second moment near a maximum it may or may not exceed).
    The response of an output element on parameter path p is rescaled by ``B_i / move_i`` of the
    input element with the same index on the same path, which for an elementwise map is exactly
    ``J_g e_g`` for the group g (parameters, each slot); the groups' responses are combined in
    quadrature, ``sqrt(sum_g (J_g e_g)^2)``, the largest over ``probes`` sign vectors kept.

    Why quadrature: the errors in w, m and v come from independent roundings.  Adding the groups'
    absolute effects (``|J| B``, the worst case) makes the bound grow geometrically on a
    converging iteration that oscillates (Adam near a minimum: J has complex eigenvalues inside
    the unit circle, |J| a spectral radius above 1; measured x1.5 per step, 1e16 in 100 steps,
    with the actual errors at rounding level); adding signed effects lets two groups cancel by
    chance and under-reads.  In quadrature a rotation neither grows nor cancels.

    Why per element: carried bounds span many decades inside one array (an element where Adam's
    second moment is tiny amplifies its error by lr a / sqrt(v) per step, a genuinely
    ill-conditioned element that ends MISTRUSTED); a single move scaled to the largest bound
    would leave every other element's move below rounding and read a zero propagation there.
    For a map coupled through a norm the cross-element terms are rescaled by the ratio of two
    elements' moves: a coarser, larger estimate, never a zero one.

    Arrays on no parameter path (a global slot; a stream op's state, which every output reads)
    are moved as a whole, and the response of every output is rescaled by the largest
    ``B_i / move_i`` of the group: as coarse, and as safe.
    """
    rng = np.random.default_rng([seed, 0x9A0B])
    center = evaluate(arrays) if center is None else center
    total = {key: np.zeros(np.shape(v)) for key, v in center.items()}
    by_group: dict[str, list[str]] = {}
    for name in arrays:
        group = (groups or {}).get(name, name)
        if group is not None and name in incoming and np.any(incoming[name] > 0) \
                and np.all(np.isfinite(incoming[name])):
            by_group.setdefault(group, []).append(name)
    for _ in range(probes):
        squares = {key: np.zeros(np.shape(v)) for key, v in center.items()}
        for names in by_group.values():
            move, per_input, overall = {}, {}, 0.0
            for n in names:
                x = np.abs(np.asarray(arrays[n], dtype=np.float64))
                size = np.maximum(tolerance.RELATIVE_STEPS[0] * x, incoming[n])
                size = np.where(size > 0, size, 1.0)  # no bound, no move: its factor below is 0
                move[n] = np.where(incoming[n] > 0, size, 0.0) * rng.choice(np.array([-1.0, 1.0]),
                                                                           size=np.shape(x))
                if _element_space(n) is None:
                    overall = max(overall, float(np.max(incoming[n] / size)))
                else:
                    per_input[_element_space(n)] = incoming[n] / size
            largest = {key: np.zeros(np.shape(v)) for key, v in center.items()}
            for moved in _moves(evaluate, arrays, move):
                for key, base in center.items():
                    factor = per_input.get(_element_space(key)) if per_input else overall
                    if factor is None or (per_input and np.shape(factor) != np.shape(base)):
                        continue
                    with np.errstate(invalid="ignore", over="ignore"):
                        d = np.abs((np.asarray(moved[key]) - np.asarray(base)) * factor)
                    largest[key] = np.maximum(largest[key], np.where(np.isfinite(d), d, 0.0))
            with np.errstate(over="ignore"):  # an infinite effect is an infinite bound
                for key in squares:
                    squares[key] = squares[key] + largest[key] ** 2
        for key in total:
            total[key] = np.maximum(total[key], np.sqrt(squares[key]))
    return total


def _moves(evaluate: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
           arrays: dict[str, np.ndarray], move: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """The step map at ``arrays + move`` and ``arrays - move`` (an element may sit next to a kink or
    a jump on one side only: a sign, a maximum, a clip), and, where a move carries a value across
    zero, at the move stopped at zero.  Rounding, underflow and flush-to-zero never change a
    value's sign: a second moment near 0 may be stored as 0 but never as negative (which the
    square root would turn into NaN, read as no effect), while a momentum's accumulated error may
    cross zero (the unclamped move)."""
    for sign in (1.0, -1.0):
        moved = {n: arrays[n] + sign * m for n, m in move.items()}
        yield evaluate({**arrays, **moved})
        crossing = {n: (np.sign(v) != np.sign(arrays[n])) & (arrays[n] != 0) for n, v in moved.items()}
        if any(np.any(c) for c in crossing.values()):
            yield evaluate({**arrays, **{n: np.where(crossing[n], 0.0, v) for n, v in moved.items()}})


def _with_fresh_inputs(evaluate: Evaluate, source: StepSource, carried: list[str]) -> Evaluate:
    """The step map with the fresh inputs recomputed from the (moved) carried ones: a model's
    gradient as a function of its parameters."""

    def step_map(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fresh = source.fresh({name: arrays[f"in.{name}"] for name in carried}, 0)
        return evaluate({**arrays, **{f"in.{name}": v for name, v in fresh.items()}})

    return step_map


def finite(tree: dict[str, np.ndarray]) -> bool:
    return all(np.all(np.isfinite(v)) for v in tree.values())

