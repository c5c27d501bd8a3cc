"""Case generation: seeded default cases from the specs, and adversarial data families.

Every case is deterministic: its random stream is seeded from ``(seed, op name, case name)``, so
the same seed gives the same inputs on every machine and in every process.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ADVERSARIAL", "DOMAINS", "FAMILIES", "LAYOUTS", "Case", "adversarial", "as_layout", "case_rng",
    "default_cases", "draw", "step_inputs", "upper_of",
]


def case_rng(seed: int, *names: str) -> np.random.Generator:
    """A generator seeded from ``seed`` and the names (stable across runs and platforms)."""
    key = zlib.crc32("/".join(names).encode())
    return np.random.default_rng([seed, key])


@dataclass
class Case:
    """One evaluation of an op: inputs (float64 NumPy arrays), hyper-parameters, provenance."""

    op: str
    name: str
    inputs: dict[str, np.ndarray]
    hparams: dict[str, Any]
    dialect: str | None = None
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    state: dict[str, np.ndarray] | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def id(self) -> str:
        return f"{self.op}/{self.name}/seed={self.seed}"

    @property
    def size(self) -> int:
        return sum(int(v.size) for v in self.inputs.values())


#: How each declared value domain (reference/spec.py ``DOMAINS``) is drawn: ``(rng, shape,
#: upper)``, ``upper`` the bound of an int64 input's values.
DOMAINS: dict[str, Callable[[np.random.Generator, tuple[int, ...], int], np.ndarray]] = {
    "normal": lambda rng, shape, upper: rng.standard_normal(shape),
    # Gains drawn around 1, so no channel is switched off (a zero gain hides its statistics).
    "around_one": lambda rng, shape, upper: 1.0 + 0.5 * rng.standard_normal(shape),
    # Step counts 0, 1, 2, ... in C order (exact integers; no random draw).
    "steps": lambda rng, shape, upper: np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape),
    # Labels / indices uniform in [0, upper): with few rows some values are absent, and
    # upper = 1 gives a single class (both edges of a per-class reduction).
    "index": lambda rng, shape, upper: rng.integers(0, upper, size=shape, dtype=np.int64),
    "mask": lambda rng, shape, upper: rng.random(shape) < 0.5,
    "uniform": lambda rng, shape, upper: rng.random(shape),
    "on_edges": lambda rng, shape, upper: _on_edges(rng, shape, upper),
}


def _on_edges(rng: np.random.Generator, shape: tuple[int, ...], bins: int) -> np.ndarray:
    """Values in [0, 1] for a metric binned at k / bins: half exactly on an edge (0 and 1
    included), a quarter ties (a copy of another value), the rest uniform: the values a binned
    metric must get right, or know it cannot."""
    values = rng.random(shape)
    flat = values.reshape(-1)
    pick = rng.random(flat.shape)
    edges = rng.integers(0, bins + 1, size=flat.shape) / bins
    flat[:] = np.where(pick < 0.5, edges, flat)
    ties = (pick >= 0.5) & (pick < 0.75)
    if flat.size > 1 and np.any(ties):
        flat[ties] = flat[rng.integers(0, flat.size, size=int(np.sum(ties)))]
    return values


def draw(rng: np.random.Generator, domain: str, shape: tuple[int, ...], upper: int = 0) -> np.ndarray:
    """Values of ``shape`` from a declared input domain (the one rule every generated case uses:
    the spec's cases here, the hypothesis strategies in conformance/strategies.py): float64 for
    the float domains, int64 in [0, ``upper``) for ``index``, bool for ``mask``."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown value domain {domain!r}; known: {sorted(DOMAINS)}")
    if domain in ("index", "on_edges") and upper < 1:
        raise ValueError(f"the {domain} domain needs upper >= 1, got {upper}")
    return DOMAINS[domain](rng, tuple(shape), upper)


def upper_of(t: Any, hparams: dict[str, Any]) -> int:
    """An int64 input's bound: its spec's ``upper``, an int or an int hyper-parameter's value."""
    return int(hparams[t.upper]) if isinstance(t.upper, str) and t.upper else int(t.upper or 0)


def default_cases(op_name: str, seed: int = 0) -> list[Case]:
    """The ``[[cases]]`` of the op's spec, each input drawn from its declared domain."""
    import reference

    spec = reference.get(op_name).spec
    cases = []
    for c in spec.cases:
        inputs = _draw_inputs(spec, c, case_rng(seed, op_name, c["name"]))
        cases.append(Case(op_name, c["name"], inputs, dict(c["hparams"]), c["dialect"], seed,
                          overrides=dict(c["overrides"])))
    return cases


def step_inputs(case: Case, k: int) -> dict[str, np.ndarray]:
    """The k-th batch of a stream case (conformance/trajectory.py): the case's own inputs at step
    0, then a fresh draw of every input from its declared domain (and the case's ``domains``), at
    the same shapes, seeded by the case and the step."""
    if k == 0:
        return case.inputs
    import reference

    spec = reference.get(case.op).spec
    recipe = next(c for c in spec.cases if c["name"] == case.name.split("@")[-1])
    return _draw_inputs(spec, {**recipe, "hparams": case.hparams},
                        case_rng(case.seed, case.op, case.name, f"step{k}"))


def _draw_inputs(spec: Any, recipe: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A spec case's inputs: each from the case's domain for it, else the input's declared one."""
    tensors = {t.name: t for t in spec.inputs}
    # An optimizer's "inputs" are its parameter paths: N(0, 1), no declared domain.
    domains = {k: recipe.get("domains", {}).get(k, tensors[k].domain if k in tensors else "normal")
               for k in recipe["shapes"]}
    return {k: draw(rng, domains[k], shape, upper_of(tensors[k], recipe["hparams"]) if k in tensors else 0)
            for k, shape in recipe["shapes"].items()}


# --------------------------------------------------------------------------------------------
# Adversarial families.  Each maps (rng, shape) to float64 data aimed at one failure mode.
# --------------------------------------------------------------------------------------------


def _offset(mean: float, std: float) -> Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]:
    def make(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return mean + std * rng.standard_normal(shape)

    return make


def _constant(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.full(shape, 3.25) + 0.0 * rng.standard_normal(shape)


def _scaled(scale: float) -> Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]:
    def make(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return scale * rng.standard_normal(shape)

    return make


def _nonfinite(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    values = rng.standard_normal(shape)
    values.flat[0] = np.nan
    values.flat[-1] = np.inf
    return values


def _mixed_scales(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # Magnitudes spread over 12 decades inside one reduction: sums lose the small terms first.
    return rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 6, size=shape)


ADVERSARIAL: dict[str, Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]] = {
    # |mean|/std = 1e11: the cancellation condition number that breaks E[x^2] - E[x]^2 and
    # even a plain two-pass mean (its rounding error u|mean| is 1e-5 of the spread).
    "offset_1e8_std_1e-3": _offset(1e8, 1e-3),
    "offset_1e4_std_1e-2": _offset(1e4, 1e-2),
    # Zero variance: x_hat must be exactly 0 (y = beta), not NaN and not noise / sqrt(eps).
    "constant": _constant,
    # Squares near 1e300 / 1e-300: still finite in float64; overflow/underflow if done carelessly.
    "huge_1e150": _scaled(1e150),
    "tiny_1e-150": _scaled(1e-150),
    "mixed_scales": _mixed_scales,
    # |x| ~ 300: x^2 ~ 9e4 overflows float16 (max 65504) unless the statistics are upcast.
    "fp16_square_overflow": _scaled(300.0),
}

#: Every family the harness runs: the finite ones above (the oracle's accuracy tests use those)
#: plus a NaN and an inf, which must stay where the oracle has them (their reduction group)
#: while every other element is judged as usual.
FAMILIES = {**ADVERSARIAL, "nonfinite": _nonfinite}

#: Memory layouts the runner hands to adapters for the ``layout-*`` cases: the same values as a
#: strided view (every other element of a larger buffer) and in Fortran (column-major) order.
LAYOUTS = ("strided", "fortran")


def as_layout(value: np.ndarray, layout: str) -> np.ndarray:
    """``value`` with the same contents in a non-contiguous memory layout."""
    if layout == "fortran":
        # asfortranarray would turn a 0-d array into shape (1,); below 2 dims order is moot.
        return np.asfortranarray(value) if value.ndim >= 2 else value
    if layout == "strided" and value.ndim:
        buffer = np.zeros(value.shape[:-1] + (2 * value.shape[-1],), dtype=value.dtype)
        buffer[..., ::2] = value
        return buffer[..., ::2]
    return value


def adversarial(family: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Float64 data of ``shape`` from one adversarial ``family`` (see ``ADVERSARIAL``)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown adversarial family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family](case_rng(seed, "adversarial", family), tuple(shape))
