"""Trajectory cases: an optimizer checked over T steps, as a user runs it.

A case is an initial set of parameters (several tensors of different shapes, named like a small
network's: ``conv/weight``, ``bn/bias``, ...), a gradient source, a learning-rate schedule, the
optimizer's hyper-parameters and T (``Profile.trajectory_steps``: 5 quick, 20 default, 200
thorough).  Gradient sources:

* ``fixed``: a seeded sequence, independent of the parameters (each tensor with its own scale
  over two decades).  Adversarial families of this source (``Profile.adversarial``): ``tiny``
  (x 1e-6: eps dominates, so its placement shows), ``huge`` (x 1e6), ``zero_tensor`` (one
  tensor's gradient is exactly 0 at every step: the "ratio = 1 if a norm is 0" and "update 0
  where the accumulator is 0" rules), ``sparse`` (70% exact zeros: sign(0), masked accumulators),
  ``mixed_scales`` (tensor scales from 1e-4 to 1e4: global norms).
* ``quadratic``: ``L(w) = sum 0.5 a (w - c)^2`` with per-element curvature a over two decades.
* ``rosenbrock``: the chained Rosenbrock function of each tensor's elements (scaled: 10 instead
  of 100), started near its minimum at 1.

For the two model sources the gradient is a function of the parameters, so a framework's
deviation feeds back into its own next gradient, as in training.

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
from conformance.cases import Case, case_rng, step_inputs
from conformance.dtypes import round_to, widen

__all__ = ["GRADIENT_FAMILIES", "SCHEDULES", "GradientSource", "OracleStep", "iter_oracle_trajectory",
           "judge_own_step", "judging_bounds", "local_bounds", "optimizer_cases", "oracle_trajectory",
           "propagate", "schedule_multipliers"]

#: A flat float64 evaluation of one step (``in./state.`` -> ``outputs./state.``), and the float32
#: same-formula baseline of a step under given hyper-parameters.
Evaluate = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
Baseline = Callable[[dict[str, Any], dict[str, np.ndarray]], dict[str, np.ndarray]]

#: Adversarial families of the fixed gradient source (see the module docstring).
GRADIENT_FAMILIES = ("tiny", "huge", "zero_tensor", "sparse", "mixed_scales")
SCHEDULES = ("constant", "drop", "warmup", "cosine", "one_cycle")
ROSENBROCK_A = 10.0


def schedule_multipliers(name: str, steps: int) -> list[float]:
    """lr_k / lr_0 for k = 0..steps-1: ``constant``; ``drop`` (x0.1 from the middle step on:
    a change mid-run); ``warmup`` (linear from 1/W to 1 over W = max(1, steps // 4) steps, as
    Goyal et al.'s gradual warmup, then constant); ``cosine`` and ``one_cycle`` (the oracle's
    schedule ops over the run: a new rate at every step)."""
    if name == "constant":
        return [1.0] * steps
    if name == "drop":
        return [1.0 if k < steps // 2 else 0.1 for k in range(steps)]
    if name == "warmup":
        w = max(1, steps // 4)
        return [min(1.0, (k + 1) / w) for k in range(steps)]
    if name in ("cosine", "one_cycle"):
        # The oracle's own schedule ops over the run (checked against torch's and optax's
        # schedulers as ops of their own): cosine annealing to 0, torch's one-cycle defaults.
        from reference.optimizers import schedules

        t = np.arange(steps, dtype=np.float64)
        lr = (schedules.cosine(t, base_lr=1.0, total_steps=steps) if name == "cosine"
              else schedules.one_cycle(t, max_lr=1.0, total_steps=steps))
        return [float(v) for v in np.asarray(lr)]
    raise ValueError(f"unknown schedule {name!r}; known: {SCHEDULES}")


def _initial(rng: np.random.Generator, path: str, shape: tuple[int, ...], source: str) -> np.ndarray:
    if source == "rosenbrock":
        return 1.0 + 0.1 * rng.standard_normal(shape)
    leaf = path.rsplit("/", 1)[-1]
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if leaf in ("weight", "scale", "gamma") and parent.startswith(("bn", "ln", "norm", "gn")):
        return 1.0 + 0.1 * rng.standard_normal(shape)
    return 0.5 * rng.standard_normal(shape)


class GradientSource:
    """The gradient at step k (see the module docstring); deterministic per seed and case."""

    def __init__(self, kind: str, shapes: dict[str, tuple[int, ...]], seed: int, op: str, case: str,
                 family: str | None = None) -> None:
        self.kind, self.shapes, self.family = kind, dict(shapes), family
        self.seed, self.op, self.case = seed, op, case
        rng = case_rng(seed, op, case, "source")
        self.scale = {p: float(10.0 ** rng.uniform(-1, 1)) for p in shapes}
        if family == "mixed_scales":
            self.scale = {p: float(10.0 ** rng.uniform(-4, 4)) for p in shapes}
        self.curvature = {p: 10.0 ** rng.uniform(-1, 1, size=s) for p, s in shapes.items()}
        self.center = {p: rng.standard_normal(s) for p, s in shapes.items()}

    @property
    def depends_on_params(self) -> bool:
        return self.kind != "fixed"

    depends_on_carried = depends_on_params

    @property
    def key(self) -> tuple[Any, ...]:
        """What determines the source's values (the memo key of a trajectory)."""
        return (self.kind, self.family, self.op, self.case, self.seed)

    def fresh(self, carried: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
        """The step's inputs that are not carried over: ``grads/<p>`` at the parameters
        ``carried`` (``params/<p>``)."""
        params = {key[len("params/"):]: v for key, v in carried.items()}
        return {f"grads/{p}": g for p, g in self(params, k).items()}

    def __call__(self, params: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
        with np.errstate(all="ignore"):  # a diverging trajectory is judged, not warned about
            return self._gradient(params, k)

    def _gradient(self, params: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
        if self.kind == "quadratic":
            return {p: self.curvature[p] * (params[p] - self.center[p]) for p in self.shapes}
        if self.kind == "rosenbrock":
            return {p: _rosenbrock_grad(params[p]) for p in self.shapes}
        return self._fixed(k)

    def _fixed(self, k: int) -> dict[str, np.ndarray]:
        out = {}
        paths = list(self.shapes)
        for p, shape in self.shapes.items():
            rng = case_rng(self.seed, self.op, self.case, f"grad{k}", p)
            g = self.scale[p] * rng.standard_normal(shape)
            if self.family == "tiny":
                g = g * 1e-6
            elif self.family == "huge":
                g = g * 1e6
            elif self.family == "zero_tensor" and p == paths[-1]:
                g = np.zeros(shape)
            elif self.family == "sparse":
                g = np.where(rng.uniform(size=shape) < 0.7, 0.0, g)
            out[p] = g
        return out


class BatchSource:
    """The inputs of a stream op at step k: the case's batch at step 0, then a fresh batch from
    every input's declared domain (:func:`conformance.cases.step_inputs`); nothing is carried
    from the outputs, so every step's inputs are known in advance and are the same, rounded, for
    the adapter and the oracle: errors enter through the state alone."""

    depends_on_carried = False

    def __init__(self, case: Case) -> None:
        self.case = case

    @property
    def key(self) -> tuple[Any, ...]:
        return ("batches", self.case.op, self.case.name, self.case.seed)

    def fresh(self, carried: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
        return step_inputs(self.case, k)


#: Where a trajectory's step inputs come from.
StepSource = GradientSource | BatchSource


def _rosenbrock_grad(w: np.ndarray) -> np.ndarray:
    """Gradient of sum_i A (x_{i+1} - x_i^2)^2 + (1 - x_i)^2 over the flattened tensor."""
    x = np.asarray(w, dtype=np.float64).reshape(-1)
    g = np.zeros_like(x)
    if x.size > 1:
        r = x[1:] - x[:-1] ** 2
        g[:-1] += -4.0 * ROSENBROCK_A * x[:-1] * r - 2.0 * (1.0 - x[:-1])
        g[1:] += 2.0 * ROSENBROCK_A * r
    else:
        g += -2.0 * (1.0 - x)
    return g.reshape(np.shape(w))


def optimizer_cases(op: str, *, adversarial: bool, seed: int) -> list[tuple[str, Case]]:
    """The spec's trajectory cases (and the gradient families on the first fixed one)."""
    spec = reference.get(op).spec
    out = []
    for c in spec.cases:
        rng = case_rng(seed, op, c["name"])
        inputs = {f"params/{p}": _initial(rng, p, shape, c["gradients"]) for p, shape in c["params"].items()}
        tags = (f"gradients:{c['gradients']}", f"schedule:{c['schedule']}", *c["tags"])
        if c["steps"]:
            tags += (f"steps:{c['steps']}",)
        out.append((c["name"], Case(op, c["name"], inputs, dict(c["hparams"]), c["dialect"], seed,
                                    overrides=dict(c["overrides"]), tags=tags)))
    fixed = [case for _, case in out if "gradients:fixed" in case.tags]
    if adversarial and fixed:
        base = fixed[0]
        for family in GRADIENT_FAMILIES:
            name = f"grad-{family}@{base.name}"
            out.append((name, Case(op, name, dict(base.inputs), dict(base.hparams), base.dialect, seed,
                                   overrides=dict(base.overrides),
                                   tags=(*base.tags, f"family:{family}", "adversarial"))))
    return out


def tag(case: Case, key: str, default: str | None = None) -> str | None:
    prefix = key + ":"
    return next((t[len(prefix):] for t in case.tags if t.startswith(prefix)), default)


def source_of(case: Case) -> StepSource:
    """The step source of a trajectory case: batches for a stream op, gradients for an optimizer."""
    if reference.get(case.op).spec.kind == "stream":
        return BatchSource(case)
    shapes = {k[len("params/"):]: tuple(np.shape(v)) for k, v in case.inputs.items()}
    base = case.name.split("@")[-1]
    return GradientSource(tag(case, "gradients", "fixed"), shapes, case.seed, case.op, base,
                          tag(case, "family"))


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

