"""Where the inputs of each trajectory step come from (conformance/trajectory.py runs the steps).

An optimizer case is an initial set of parameters (several tensors of different shapes, named
like a small network's: ``conv/weight``, ``bn/bias``, ...), a gradient source, a learning-rate
schedule and the optimizer's hyper-parameters; its parameters are carried from step to step.
Gradient sources:

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

A stream op's case is a batch recipe (a spec case): step 0 reads the case's inputs, every later
step a fresh draw from the inputs' declared domains (:class:`BatchSource`); nothing is carried but
the state.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import reference
from conformance.cases import Case, case_rng, step_inputs

__all__ = ["GRADIENT_FAMILIES", "ROSENBROCK_A", "SCHEDULES", "BatchSource", "GradientSource", "StepSource",
           "optimizer_cases", "schedule_multipliers", "source_of", "tag"]

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
