"""Random ops checked in distribution, for adapters that sample their own randomness.

An op that samples (InfoBatch's pruning, a stochastic rounding, an injected noise) takes its
random draws as inputs (a spec's ``draws = true``), so the oracle is a deterministic function and
an adapter given the same draws is compared with it exactly, like any op.  A framework that
cannot be given the draws (it calls its own generator) declares ``OpSupport.takes_draws =
False``; its case is then judged here, in distribution:

* the request carries every input but the draws; the adapter is called M times
  (``Profile.draw_samples``: 2000 quick, 4000 default, 20000 thorough; one timeout, ten times
  the per-call one, covers them all) and returns M samples of each output;
* the spec's ``expectation`` gives, per output element, the mean over the draws and a range
  [low, high] holding it almost surely, at the inputs both sides read;
* each element's sample mean must lie within

      t_i = (high_i - low_i) sqrt(ln(2 m / alpha) / (2 M))  +  K u |extreme_i|

  of the expected mean: Hoeffding's inequality, P(|mean - E| >= t) <= 2 exp(-2 M t^2 / R^2),
  with a union bound over the m elements of the case, so a correct sampler FAILs a case with
  probability at most alpha = ``FALSE_ALARM`` = 1e-6 whatever its distribution; the second term
  is the rounding of the samples to the dtype (K u of the largest value in the range).

A deviation beyond t_i is FAIL (the sampler is biased: a missing rescale, a wrong threshold);
the comparison's ratio is deviation / t_i.  The test has power against biases above t_i only
(about 0.07 R for m = 64 elements and M = 4000, the default profile): a smaller bias, such as
the floor of a quota, needs the exact comparison with given draws.  Stateless ops only: an op
with state and draws would need the state's distribution too (such a case is SKIP).
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

import reference
from conformance import support, tolerance
from conformance.adapters import Adapter, OpSupport, Request
from conformance.dtypes import UNIT_ROUNDOFF, round_to, widen
from conformance.outcome import CaseResult, call_adapter, summarize
from conformance.planning import PlannedCase, Profile

__all__ = ["FALSE_ALARM", "run_distributional", "threshold"]

#: The probability that a correct sampler FAILs a case (a union bound over its elements).
FALSE_ALARM = 1e-6


def threshold(low: np.ndarray, high: np.ndarray, samples: int, elements: int, dtype: str) -> np.ndarray:
    """t_i of the module docstring: Hoeffding's half-width at FALSE_ALARM over ``elements``, plus
    the rounding of the samples to ``dtype``."""
    spread = np.asarray(high, dtype=np.float64) - np.asarray(low, dtype=np.float64)
    statistical = spread * math.sqrt(math.log(2.0 * max(elements, 1) / FALSE_ALARM) / (2.0 * samples))
    extreme = np.maximum(np.abs(low), np.abs(high))
    return statistical + tolerance.K * UNIT_ROUNDOFF[dtype] * extreme


def run_distributional(
    adapter: Adapter, planned: PlannedCase, prof: Profile, op: reference.Op, hp: dict[str, Any],
    sup: OpSupport, result: CaseResult, seconds: float,
) -> None:
    """Judge one case of an op with draws for an adapter that samples its own (module docstring)."""
    spec, dtype = op.spec, planned.dtype
    if spec.state:
        result.verdict = "SKIP"
        result.message = "a stateful op with random draws is not checked in distribution"
        return
    hp = support.round_hparams(planned.op, hp, sup.hparam_dtype)
    given = {k: v for k, v in planned.case.inputs.items() if k not in spec.draws}
    inputs = round_to(given, dtype)
    t0 = time.perf_counter()
    expected = op.expectation(widen(inputs), spec.resolve(hp))
    result.seconds_oracle += time.perf_counter() - t0
    request = Request(planned.op, dtype, inputs, None, dict(hp), None)
    samples = prof.draw_samples
    sums: dict[str, np.ndarray] = {name: np.zeros(np.shape(mean)) for name, (mean, _, _) in expected.items()}
    # One timed call draws every sample (a thread per sample would cost more than most samplers).
    responses = call_adapter(_Repeated(adapter, samples), planned.op, request, seconds * 10, result, 0)
    if responses is None:
        return
    for k, response in enumerate(responses):
        problem = _malformed(response.outputs, expected)
        if problem:
            result.error(problem[0], f"sample {k}: {problem[1]}", 0)
            return
        for name in sums:
            sums[name] += np.asarray(response.outputs[name], dtype=np.float64)
    elements = sum(int(np.size(mean)) for mean, _, _ in expected.values())
    comps = [_compare(name, sums[name] / samples, *expected[name], samples, elements, dtype) for name in sums]
    summarize(result, [SimpleNamespace(comparisons=comps)])
    result.steps = samples


class _Repeated:
    """The adapter asked for ``samples`` responses to one request (its own draws each time)."""

    def __init__(self, adapter: Adapter, samples: int) -> None:
        self.adapter, self.samples, self.name = adapter, samples, adapter.name

    def evaluate(self, op: str, request: Request) -> list[Any]:
        return [self.adapter.evaluate(op, request) for _ in range(self.samples)]


def _malformed(outputs: dict[str, Any], expected: dict[str, tuple[Any, Any, Any]]) -> tuple[str, str] | None:
    for name, (mean, _, _) in expected.items():
        if name not in outputs:
            return "missing", f"the adapter returned no {name!r}"
        value = np.asarray(outputs[name])
        if value.shape != np.shape(mean):
            return "shape", f"{name!r} has shape {value.shape}, expected {np.shape(mean)}"
        if not np.all(np.isfinite(value.astype(np.float64))):
            return "nonfinite", f"{name!r} is not finite"
    return None


def _compare(name: str, mean: np.ndarray, expected: Any, low: Any, high: Any, samples: int, elements: int,
             dtype: str) -> tolerance.Comparison:
    expected = np.asarray(expected, dtype=np.float64)
    t = threshold(np.asarray(low), np.asarray(high), samples, elements, dtype)
    deviation = np.abs(mean - expected)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(t > 0, deviation / t, np.where(deviation > 0, np.inf, 0.0))
    worst = np.unravel_index(int(np.argmax(ratios)), np.shape(ratios)) if np.size(ratios) else ()
    ratio = float(ratios[worst]) if np.size(ratios) else 0.0
    scale = float(np.max(np.abs(expected))) if np.size(expected) else 0.0
    return tolerance.Comparison(
        f"mean(outputs.{name})", "fail" if ratio > 1.0 else "ok", ratio,
        float(np.max(deviation)) if np.size(deviation) else 0.0,
        float(np.max(deviation)) / scale if scale else 0.0,
        float(t[worst]) if np.size(t) else 0.0, tuple(int(i) for i in worst),
        note=(f"the mean of {samples} samples from the adapter's own draws against the expectation "
              f"(Hoeffding, false-alarm rate {FALSE_ALARM:g} per case)"))
