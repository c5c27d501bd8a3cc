"""Which cases a run asks an adapter for: profiles, case expansion, the plan and its coverage.

Only what the adapter declares is planned: the selected ops it implements, in the selected
dtypes it computes (``OpSupport.dtypes``).  :func:`coverage` says what was left out (ops it does
not implement, dtypes it does not support), so a report can say so in one line instead of a
screen of SKIPs.  Expansion of one op (:func:`cases_for`): the spec's seeded cases (realistic
sizes in the default profile), the adversarial families on the first small case, a tiny eps,
non-contiguous layouts, and seeded random cases; optimizers get trajectory cases
(conformance/trajectory.py).  The same seed gives the same cases.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

import reference
from conformance import support, trajectory
from conformance.cases import FAMILIES, LAYOUTS, Case, case_rng, default_cases
from conformance.dtypes import DTYPES

__all__ = ["PROFILES", "Coverage", "PlannedCase", "Profile", "cases_for", "coverage", "find_case",
           "plan", "possible_ids", "select_ops"]

#: Inputs above this many elements are "realistic size" (the spec's large cases).
REALISTIC_SIZE = 100_000


@dataclass(frozen=True)
class Profile:
    name: str
    steps: int            # steps of a stateful case
    adversarial: bool     # add the adversarial families
    realistic: bool       # keep the spec's realistic-size cases
    random: int           # extra seeded random cases per op (shapes and hyper-parameters)
    timeout: float        # seconds per adapter call
    trajectory_steps: int = 20  # steps of an optimizer trajectory (conformance/trajectory.py)
    draw_samples: int = 4000    # samples of an op with draws for an adapter drawing its own
                                # (conformance/distributional.py)


PROFILES = {
    "quick": Profile("quick", steps=3, adversarial=False, realistic=False, random=0, timeout=30.0,
                     trajectory_steps=5, draw_samples=2000),
    "default": Profile("default", steps=5, adversarial=True, realistic=True, random=2, timeout=60.0,
                       trajectory_steps=20),
    "thorough": Profile("thorough", steps=10, adversarial=True, realistic=True, random=20, timeout=120.0,
                        trajectory_steps=200, draw_samples=20000),
}


@dataclass
class PlannedCase:
    """A case before it runs: everything needed to rebuild it from its id."""

    op: str
    dtype: str
    name: str
    seed: int
    case: Case

    def id(self, adapter: str) -> str:
        return f"{adapter}:{self.op}:{self.dtype}:{self.name}:{self.seed}"


@dataclass
class Coverage:
    """What a run's selection holds and what the adapter leaves out of it."""

    selected: list[str] = field(default_factory=list)         # ops the --ops pattern selects
    dtypes: list[str] = field(default_factory=list)           # dtypes the run asks for
    not_implemented: list[str] = field(default_factory=list)  # selected ops the adapter lacks
    unsupported: dict[str, list[str]] = field(default_factory=dict)  # op -> asked dtypes it lacks
    forward_only: list[str] = field(default_factory=list)     # differentiable ops without gradients
    not_kept: dict[str, list[str]] = field(default_factory=dict)     # op -> state not compared

    @property
    def implemented(self) -> list[str]:
        return [op for op in self.selected if op not in self.not_implemented]


def primary_input(op: str) -> str:
    spec = reference.get(op).spec
    return next(t.name for t in spec.inputs if not t.optional)


def _adversarial_cases(op: str, base: Case) -> list[tuple[str, Case]]:
    primary = primary_input(op)
    out = []
    for family in FAMILIES:
        rng = case_rng(base.seed, op, "adv", family)
        inputs = dict(base.inputs)
        inputs[primary] = FAMILIES[family](rng, base.inputs[primary].shape)
        name = f"adv-{family}@{base.name}"
        out.append((name, replace(base, name=name, inputs=inputs, overrides=dict(base.overrides),
                                  tags=("adversarial",))))
    spec = reference.get(op).spec
    eps = spec.hparams.get("eps")
    if eps is not None and eps.type == "float":
        # eps -> 0: the smallest eps any dialect table uses (BERT's LayerNorm) on ordinary data.
        name = f"eps_1e-12@{base.name}"
        out.append((name, replace(base, name=name, hparams={**base.hparams, "eps": 1e-12},
                                  overrides={**base.overrides, "eps": 1e-12}, tags=())))
    for layout in LAYOUTS:
        name = f"layout-{layout}@{base.name}"
        out.append((name, replace(base, name=name, tags=(f"layout:{layout}",))))
    return out


def _random_hparams(op: str, rng: np.random.Generator) -> dict[str, Any]:
    """Random values for the continuous hyper-parameters within their declared domains."""
    spec = reference.get(op).spec
    out: dict[str, Any] = {}
    for name, p in spec.hparams.items():
        if name == "eps" and p.type == "float":
            out[name] = float(10.0 ** rng.uniform(-8, -1))
        elif name == "momentum" and p.type == "float":
            out[name] = float(rng.uniform(0.01, 0.99))
    return out


def _random_cases(op: str, base: Case, count: int, seed: int) -> list[tuple[str, Case]]:
    out = []
    for k in range(count):
        name = f"rand{k}@{base.name}"
        rng = case_rng(seed, op, name)
        drawn = _random_hparams(op, rng)
        inputs = {key: rng.standard_normal(v.shape) * float(10.0 ** rng.uniform(-2, 2))
                  if key == primary_input(op) else v for key, v in base.inputs.items()}
        out.append((name, replace(base, name=name, inputs=inputs, hparams={**base.hparams, **drawn},
                                  seed=seed, overrides={**base.overrides, **drawn}, tags=("random",))))
    return out


@functools.lru_cache(maxsize=64)
def cases_for(op: str, profile: Profile, seed: int) -> tuple[tuple[str, Case], ...]:
    """Every case of one op under a profile and seed (cached: each dtype reuses them)."""
    spec = reference.get(op).spec
    if spec.is_optimizer:
        return tuple(trajectory.optimizer_cases(op, adversarial=profile.adversarial, seed=seed))
    base = default_cases(op, seed)
    if not spec.differentiable:
        # Functions of exact inputs (schedules of the step count): the spec's cases only.
        return tuple((c.name, c) for c in base)
    cases = [(c.name, c) for c in base if profile.realistic or c.size <= REALISTIC_SIZE]
    small = [c for c in base if c.size <= REALISTIC_SIZE]
    if profile.adversarial and small:
        cases += _adversarial_cases(op, small[0])
    if profile.random and small:
        cases += _random_cases(op, small[0], profile.random, seed)
    return tuple(cases)


def select_ops(ops: str | None) -> list[str]:
    """The registered ops whose name or ``<family>/<name>`` the regex ``ops`` searches ("optim":
    every optimizer, "normalizers", "^adam$" or "/adam$": one op).  A bad regex is a
    :class:`~conformance.support.ConfigurationError`."""
    if not ops:
        return reference.ops()
    try:
        pattern = re.compile(ops)
    except re.error as exc:
        raise support.ConfigurationError(f"--ops {ops!r} is not a valid regex: {exc}") from None
    return [op for op in reference.ops()
            if pattern.search(op) or pattern.search(f"{reference.get(op).spec.family}/{op}")]


def _profile(profile: str, max_examples: int | None) -> Profile:
    if profile not in PROFILES:
        raise support.ConfigurationError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    prof = PROFILES[profile]
    if max_examples is not None:
        if max_examples < 0:
            raise support.ConfigurationError(f"max_examples must be >= 0, got {max_examples}")
        prof = replace(prof, random=max_examples)
    return prof


def _check_dtypes(dtypes: Iterable[str]) -> list[str]:
    dtypes = list(dtypes)
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise support.ConfigurationError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return dtypes


def plan(
    adapter: Any,
    *,
    ops: str | None = None,
    dtypes: Iterable[str] = ("float64", "float32", "float16"),
    seed: int = 0,
    profile: str = "default",
    max_examples: int | None = None,
) -> list[PlannedCase]:
    """Every (op, dtype, case) the adapter will be asked for, in a stable order.

    The adapter's ``ops()`` is validated first (a misspelt op, dtype or knob is a
    :class:`~conformance.support.ConfigurationError`); ops and dtypes it does not declare are not
    planned (see :func:`coverage`).
    """
    if seed < 0:
        raise support.ConfigurationError(f"seed must be >= 0, got {seed}")
    prof = _profile(profile, max_examples)
    wanted = _check_dtypes(dtypes)
    declared = support.validate(adapter)
    planned = []
    for op in select_ops(ops):
        if op not in declared:
            continue
        for dtype in wanted:
            if dtype not in declared[op].dtypes:
                continue
            for name, case in cases_for(op, prof, seed):
                planned.append(PlannedCase(op, dtype, name, seed, case))
    return planned


def coverage(adapter: Any, *, ops: str | None = None, dtypes: Iterable[str] = ("float64", "float32")
             ) -> Coverage:
    """What the selection holds and what the adapter leaves out (after :func:`plan` validated it)."""
    declared = support.validate(adapter)
    wanted = _check_dtypes(dtypes)
    cov = Coverage(selected=select_ops(ops), dtypes=wanted)
    for op in cov.selected:
        sup = declared.get(op)
        if sup is None:
            cov.not_implemented.append(op)
            continue
        missing = [d for d in wanted if d not in sup.dtypes]
        if missing:
            cov.unsupported[op] = missing
        spec = reference.get(op).spec
        if not sup.gradients and spec.differentiable and not spec.is_optimizer:
            cov.forward_only.append(op)
        if sup.not_kept:
            cov.not_kept[op] = list(sup.not_kept)
    return cov


def possible_ids(adapter: Any, *, seed: int) -> list[str]:
    """Every case id the adapter could be asked for with this seed (any selection, every declared
    dtype, the thorough profile's cases: a superset of the others'): what an expected-failures
    entry can match."""
    declared = support.validate(adapter)
    # Realistic-size cases are named in the spec; generating their arrays only for their names
    # would cost seconds and hundreds of MB.
    prof = replace(PROFILES["thorough"], realistic=False)
    names = {op: list(dict.fromkeys([name for name, _ in cases_for(op, prof, seed)]
                                    + [c["name"] for c in reference.get(op).spec.cases]))
             for op in declared}
    return [f"{adapter.name}:{op}:{dtype}:{name}:{seed}"
            for op, sup in declared.items() for dtype in sup.dtypes for name in names[op]]


def find_case(op: str, name: str, seed: int, dtype: str, profile: str = "thorough") -> PlannedCase:
    """Rebuild one planned case from the parts of its id (for ``normref repro``)."""
    if op not in reference.ops():
        raise KeyError(f"unknown op {op!r}")
    if dtype not in DTYPES:
        raise KeyError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    for case_name, case in cases_for(op, PROFILES[profile], seed):
        if case_name == name:
            return PlannedCase(op, dtype, name, seed, case)
    raise KeyError(f"no case {name!r} for op {op!r} with seed {seed}")
