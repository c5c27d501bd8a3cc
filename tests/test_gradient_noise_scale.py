"""The gradient noise scale (reference/estimators/gradient_noise_scale.py), a stream op.

(1) the paper's statements as properties: the two-batch estimates are unbiased (Monte Carlo
with known G and Sigma), B_simple is the ratio of the averages, noiseless gradients give
tr(Sigma) = 0, loss scaling leaves B_simple alone, the bias correction cancels in it;
(2) the stream harness on it: the same-precision baseline passes every dtype over free-running
trajectories, and plausible mistakes FAIL at the step they enter.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from conformance import runner
from conformance.adapters import OpSupport
from conformance.adapters.numpy32 import NumPy32Adapter
from reference.estimators.gradient_noise_scale import estimates

OP = reference.get("gradient_noise_scale")
U = 2.0**-53
DTYPES = ("float64", "float32", "float16", "bfloat16")


def run_stream(batches: list[tuple[np.ndarray, np.ndarray]], **hp) -> list[dict[str, np.ndarray]]:
    """The op's outputs over a stream of (g_small, g_big) batches, state carried."""
    state, out = None, []
    for g_small, g_big in batches:
        inputs = {"g_small": g_small, "g_big": g_big}
        state = state if state is not None else OP.init_state(inputs, **hp)
        outputs, state = OP.apply(inputs, state, **hp)
        out.append({**outputs, **{f"state.{k}": v for k, v in state.items()}})
    return out


def random_batches(seed: int, steps: int, size: int = 12) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(size), rng.standard_normal(size)) for _ in range(steps)]


# --------------------------------------------------------------------------------------------
# (1) properties
# --------------------------------------------------------------------------------------------


@pytest.mark.checks("estimates_are_unbiased")
def test_estimates_are_unbiased():
    """App. A.1: with per-example gradients of mean G and covariance Sigma, the means of B_small
    and B_big of them give E[G2] = |G|^2 and E[S] = tr(Sigma).  Monte Carlo over M trials: the
    sample mean is within 5 standard errors (a false alarm has probability < 1e-6 per check
    under the normal approximation, which M = 20000 makes accurate); the seed is fixed."""
    rng = np.random.default_rng(7)
    d, b_small, b_big, trials = 6, 3, 12, 20_000
    g = rng.standard_normal(d)
    scales = 10.0 ** rng.uniform(-0.5, 0.5, size=d)          # Sigma = diag(scales^2)
    examples = g + scales * rng.standard_normal((trials, b_big, d))
    g_small, g_big = examples[:, :b_small].mean(axis=1), examples.mean(axis=1)
    sq_small, sq_big = np.sum(g_small**2, axis=1), np.sum(g_big**2, axis=1)
    g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    s = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    # The oracle's estimates are these formulas (checked on a few trials through the op itself).
    for i in range(3):
        assert np.allclose(estimates(g_small[i], g_big[i], b_small, b_big), (g2[i], s[i]), rtol=1e-13)
    for values, truth in ((g2, np.sum(g**2)), (s, np.sum(scales**2))):
        stderr = np.std(values) / np.sqrt(trials)
        assert abs(np.mean(values) - truth) <= 5 * stderr, (np.mean(values), truth, stderr)
    # A biased estimator is caught by the same test: |G_big|^2 alone over-estimates |G|^2 by
    # tr(Sigma) / B_big, here many standard errors.
    stderr = np.std(sq_big) / np.sqrt(trials)
    assert abs(np.mean(sq_big) - np.sum(g**2)) > 5 * stderr


@pytest.mark.checks("ratio_of_averages_not_average_of_ratios")
@given(seed=st.integers(0, 2**32 - 1), beta=st.floats(0.0, 0.95))
def test_b_simple_is_the_ratio_of_the_averages(seed, beta):
    """B_simple = EMA(S) / EMA(G2) at every step, from the state the op returns (App. A.1); the
    EMAs are beta-averages of the step's own estimates from 0."""
    batches = random_batches(seed, 4)
    ema_g2 = ema_s = 0.0
    for (g_small, g_big), out in zip(batches, run_stream(batches, beta=beta, b_small=2, b_big=8), strict=True):
        g2, s = estimates(g_small, g_big, 2, 8)
        ema_g2, ema_s = beta * ema_g2 + (1 - beta) * g2, beta * ema_s + (1 - beta) * s
        assert out["state.ema_g2"] == pytest.approx(ema_g2, rel=64 * U, abs=64 * U * abs(g2))
        assert out["state.ema_s"] == pytest.approx(ema_s, rel=64 * U, abs=64 * U * abs(s))
        assert out["b_simple"] == out["state.ema_s"] / out["state.ema_g2"]


def test_the_average_of_ratios_is_another_number():
    """The mistake App. A.1 warns of differs: after a few steps the EMA of the per-step ratios
    S/G2 is not EMA(S)/EMA(G2) (both from the same stream)."""
    batches = random_batches(3, 5)
    out = run_stream(batches, beta=0.5, bias_correction="none", b_small=2, b_big=8)
    ema_ratio = 0.0
    for g_small, g_big in batches:
        g2, s = estimates(g_small, g_big, 2, 8)
        ema_ratio = 0.5 * ema_ratio + 0.5 * s / g2
    assert abs(ema_ratio - out[-1]["b_simple"]) > 0.1 * abs(out[-1]["b_simple"])


@pytest.mark.checks("exact_for_noiseless_gradients")
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 30))
def test_noiseless_gradients_have_no_trace(seed, size):
    """G_small = G_big = G (no sampling noise): S = 0 exactly (|G_small|^2 - |G_big|^2 is a
    difference of two identical sums), G2 = |G|^2, so B_simple = 0."""
    g = np.random.default_rng(seed).standard_normal(size)
    (out,) = run_stream([(g, g.copy())])
    assert out["trace_sigma"] == 0.0 and out["b_simple"] == 0.0
    assert out["g2"] == pytest.approx(np.sum(g**2), rel=16 * U * size)


@pytest.mark.checks("invariant_to_loss_scaling")
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(-20, 20))
def test_loss_scaling_leaves_the_noise_scale(seed, k):
    """Scaling the loss by c scales every gradient by c: G2 and S by c^2, B_simple unchanged.
    With c = 2^k every product is exact, so the identities hold bit for bit."""
    batches = random_batches(seed, 3)
    c = 2.0**k
    plain = run_stream(batches)
    scaled = run_stream([(c * a, c * b) for a, b in batches])
    for p, q in zip(plain, scaled, strict=True):
        assert q["b_simple"] == p["b_simple"]
        assert q["g2"] == c * c * p["g2"] and q["trace_sigma"] == c * c * p["trace_sigma"]


@pytest.mark.checks("bias_correction_cancels_in_the_ratio")
@given(seed=st.integers(0, 2**32 - 1), beta=st.floats(0.0, 0.999))
def test_the_bias_correction_cancels_in_the_ratio(seed, beta):
    """The correction 1/(1 - beta^t) multiplies both averages, whatever t counts: B_simple is the
    same number under every bias_correction, and the corrected averages differ by the ratio of
    the corrections (gpt-neox counts b_big / b_small = 4 small batches per estimate)."""
    batches = random_batches(seed, 3)
    runs = {bc: run_stream(batches, beta=beta, b_small=2, b_big=8, bias_correction=bc)
            for bc in ("estimates", "small_batches", "none")}
    for t in range(3):
        values = {bc: out[t] for bc, out in runs.items()}
        assert len({float(v["b_simple"]) for v in values.values()}) == 1
        raw = values["none"]["g2"]
        assert values["estimates"]["g2"] == pytest.approx(raw / (1 - beta ** (t + 1)), rel=8 * U)
        assert values["small_batches"]["g2"] == pytest.approx(raw / (1 - beta ** (4 * (t + 1))), rel=8 * U)


# --------------------------------------------------------------------------------------------
# (2) the stream harness
# --------------------------------------------------------------------------------------------


class _Gns(NumPy32Adapter):
    name = "gns"

    def ops(self):
        return {"gradient_noise_scale": OpSupport({}, DTYPES, "test")}


class _RatioOfTheStepsEstimates(_Gns):
    """Reports the step's own S / G2, not the ratio of the averages (the state is right)."""

    name = "step-ratio"

    def evaluate(self, op, request):
        response = super().evaluate(op, request)
        hp = request.hparams
        g2, s = estimates(*(np.asarray(request.inputs[k], dtype=np.float64) for k in ("g_small", "g_big")),
                          hp["b_small"], hp["b_big"])
        response.outputs["b_simple"] = np.asarray(s / g2).astype(request.inputs["g_small"].dtype)
        return response


class _CountsSmallBatches(_Gns):
    """Corrects the averages as gpt-neox does (t counts small batches) where the estimates count."""

    name = "neox-count"

    def evaluate(self, op, request):
        return super().evaluate(op, dataclasses.replace(
            request, hparams={**request.hparams, "bias_correction": "small_batches"}))


class _ForgetsTheState(_Gns):
    """Starts every call from a fresh state (an estimator re-created per step)."""

    name = "fresh-state"

    def evaluate(self, op, request):
        inputs = {k: np.asarray(v) for k, v in request.inputs.items()}
        zero = {k: np.zeros_like(np.asarray(v)) for k, v in request.state.items()}
        return super().evaluate(op, dataclasses.replace(request, inputs=inputs, state=zero))


def test_the_same_precision_baseline_passes_every_dtype_over_the_stream():
    adapter = _Gns()
    planned = runner.plan(adapter, ops="^gradient_noise_scale$", dtypes=DTYPES, profile="quick")
    results = runner.run(adapter, planned, profile="quick")
    assert {r.verdict for r in results} <= {"PASS", "MISTRUSTED"}
    passed = [r for r in results if r.verdict == "PASS"]
    assert passed and all(r.steps == runner.PROFILES["quick"].trajectory_steps for r in passed)
    assert {r.dtype for r in passed} >= {"float64", "float32"}


@pytest.mark.parametrize("mutant", [_RatioOfTheStepsEstimates(), _ForgetsTheState()], ids=lambda m: m.name)
def test_stream_mutants_fail(mutant):
    """A wrong output (the step's own ratio) FAILs at the first step where the averages hold more
    than one estimate; a lost state FAILs at step 1 on the state itself."""
    planned = runner.plan(mutant, ops="^gradient_noise_scale$", dtypes=("float64", "float32"), profile="quick")
    results = runner.run(mutant, planned, profile="quick")
    assert all(r.verdict == "FAIL" for r in results), [(r.id, r.verdict, r.message) for r in results]


def test_the_other_bias_correction_is_diagnosed_as_a_convention():
    """gpt-neox's count (small batches) under the 'estimates' dialect: g2 and trace_sigma differ,
    B_simple does not; the diagnosis names the knob.  The gpt_neox case declares that count, so
    it passes."""
    mutant = _CountsSmallBatches()
    planned = runner.plan(mutant, ops="^gradient_noise_scale$", dtypes=("float64", "float32"), profile="quick")
    results = runner.run(mutant, planned, profile="quick")
    for r in results:
        if r.case == "gpt_neox":
            assert r.verdict == "PASS", (r.id, r.message)
        else:
            assert r.verdict == "CONVENTION" and "bias_correction='small_batches'" in r.message, (r.id, r.message)
