"""InfoBatch's soft pruning (reference/selection/infobatch.py), an op with random draws.

(1) the paper's and the official code's statements as properties: unbiased weights under the
paper's rule (exactly, over the draw's distribution), the official count's floor bias, the
weights' values, nothing at or above the mean pruned, the official quota kept exactly;
(2) randomness as an input in the harness: an adapter given the draws is compared exactly (a
wrong rescale FAILs); an adapter drawing its own is checked in distribution (a correct sampler
PASSes, one that forgets the rescale FAILs, at a stated false-alarm rate).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from conformance import distributional, runner
from conformance.adapters import OpSupport, Response
from conformance.adapters.numpy32 import NumPy32Adapter

OP = reference.get("infobatch")
DTYPES = ("float64", "float32", "float16", "bfloat16")


def weights(scores, u, **hp) -> np.ndarray:
    (w,) = OP.apply({"scores": scores, "u": u}, None, **hp)[0].values()
    return np.asarray(w)


def exact_mean_over_draws(scores, **hp) -> np.ndarray:
    """E[w] over u ~ U[0,1)^N, by exhaustion: for bernoulli each u_i matters only through
    u_i < r, so two draws per sample (one each side of r) weighted r and 1 - r give the exact
    expectation; for exact_count every ordering of the well-learned draws is equally likely, so
    the mean over all cyclic shifts of one ordering's ranks is exact (each sample is kept in
    quota of the n_wl shifts)."""
    n = len(scores)
    r = hp.get("prune_ratio", 0.5)
    if hp.get("rule", "bernoulli") == "bernoulli":
        total = np.zeros(n)
        for i in range(n):
            for u_i, p in ((0.5 * r, r), (0.5 * (1 + r), 1 - r)):
                u = np.full(n, 0.5 * (1 + r))
                u[i] = u_i
                total[i] += p * weights(scores, u, **hp)[i]
        return total
    well = np.flatnonzero(scores < np.mean(scores))
    total = np.zeros(n)
    for shift in range(max(len(well), 1)):
        u = np.full(n, 0.999)
        u[well] = (np.arange(len(well)) + shift) % len(well) / (len(well) + 1)
        total += weights(scores, u, **hp)
    return total / max(len(well), 1)


scores_st = st.integers(0, 2**32 - 1).map(lambda s: np.random.default_rng(s).standard_normal(
    int(np.random.default_rng(s).integers(2, 40))))


# --------------------------------------------------------------------------------------------
# (1) properties
# --------------------------------------------------------------------------------------------


@pytest.mark.checks("expected_weight_is_one")
@given(scores=scores_st, r=st.floats(0.0, 0.9))
def test_expected_weight_is_one(scores, r):
    """Sec. 3.2: a well-learned sample is kept with probability 1 - r and weighted 1/(1 - r), so
    E[w_i] = 1 for every sample (computed exactly over the draw's distribution); the spec's
    expectation says the same."""
    mean = exact_mean_over_draws(scores, prune_ratio=r)
    assert np.allclose(mean, 1.0, rtol=0, atol=8 * 2.0**-53)
    declared, low, high = OP.expectation({"scores": scores}, {"prune_ratio": r, "rule": "bernoulli"})["weights"]
    assert np.array_equal(declared, np.ones_like(scores)) and np.all(low <= mean) and np.all(mean <= high)


@pytest.mark.checks("official_count_is_biased_by_the_floor")
@given(scores=scores_st, r=st.floats(0.0, 0.9))
def test_official_count_is_biased_by_the_floor(scores, r):
    """The official prune() keeps int(k n_wl) of n_wl well-learned samples (k = 1 - r): the
    expected weight of each is floor(k n_wl) / (k n_wl), 1 only when k n_wl is an integer."""
    mean = exact_mean_over_draws(scores, prune_ratio=r, rule="exact_count")
    well = scores < np.mean(scores)
    k, n_wl = 1.0 - r, int(np.sum(well))
    expected = np.where(well, math.floor(k * n_wl) / (k * n_wl) if n_wl else 1.0, 1.0)
    assert np.allclose(mean, expected, rtol=0, atol=16 * 2.0**-53)
    declared = OP.expectation({"scores": scores}, {"prune_ratio": r, "rule": "exact_count"})["weights"][0]
    assert np.allclose(declared, expected, rtol=0, atol=4 * 2.0**-53)


@pytest.mark.checks("weights_are_zero_one_or_rescaled", "never_prunes_at_or_above_the_mean")
@given(scores=scores_st, seed=st.integers(0, 2**32 - 1), r=st.floats(0.0, 0.9),
       rule=st.sampled_from(["bernoulli", "exact_count"]))
def test_weights_take_three_values_and_spare_the_rest(scores, seed, r, rule):
    u = np.random.default_rng(seed).random(len(scores))
    w = weights(scores, u, prune_ratio=r, rule=rule)
    well = scores < np.mean(scores)
    assert np.all(w[~well] == 1.0)                       # at or above the mean: always kept, weight 1
    assert np.all((w[well] == 0.0) | (w[well] == 1.0 / (1.0 - r)))
    if rule == "bernoulli":
        assert np.array_equal(w[well] == 0.0, u[well] < r)


@pytest.mark.checks("keeps_the_quota_exactly")
@given(scores=scores_st, seed=st.integers(0, 2**32 - 1), r=st.floats(0.0, 0.9))
def test_keeps_the_quota_exactly(scores, seed, r):
    """exact_count keeps floor((1 - r) n_wl) well-learned samples: those with the smallest draws."""
    u = np.random.default_rng(seed).random(len(scores))
    w = weights(scores, u, prune_ratio=r, rule="exact_count")
    well = np.flatnonzero(scores < np.mean(scores))
    quota = math.floor((1.0 - r) * len(well))
    kept = well[w[well] > 0]
    assert len(kept) == quota
    assert set(kept) == set(well[np.argsort(u[well], kind="stable")[:quota]])


# --------------------------------------------------------------------------------------------
# (2) randomness as an input in the harness
# --------------------------------------------------------------------------------------------


class _GivenDraws(NumPy32Adapter):
    name = "given-draws"

    def ops(self):
        return {"infobatch": OpSupport({}, DTYPES, "test")}


class _RescalesByR(_GivenDraws):
    """Weights the kept samples 1/r instead of 1/(1 - r)."""

    name = "rescale-by-r"

    def evaluate(self, op, request):
        response = super().evaluate(op, request)
        w = np.asarray(response.outputs["weights"])
        r = request.hparams["prune_ratio"]
        rescaled = (w != 0) & (w != 1)
        response.outputs["weights"] = np.where(rescaled, 1.0 / r, w).astype(w.dtype)
        return response


class _OwnDraws(NumPy32Adapter):
    """Draws its own u (a framework's sampler), in the request's dtype."""

    name = "own-draws"
    rescale = True

    def __init__(self):
        super().__init__()
        self.rng = np.random.default_rng(1234)

    def ops(self):
        return {"infobatch": OpSupport({}, DTYPES, "test", takes_draws=False)}

    def evaluate(self, op, request):
        assert "u" not in request.inputs, "an adapter drawing its own is not given the draws"
        scores = np.asarray(request.inputs["scores"])
        u = self.rng.random(scores.shape).astype(scores.dtype)
        w = super().evaluate(op, type(request)(request.op, request.dtype, {"scores": scores, "u": u}, None,
                                               request.hparams, None)).outputs["weights"]
        if not self.rescale:
            w = np.minimum(w, 1).astype(w.dtype)
        return Response(outputs={"weights": w})


class _ForgetsTheRescale(_OwnDraws):
    name = "no-rescale"
    rescale = False


def test_given_draws_are_compared_exactly():
    planned = runner.plan(_GivenDraws(), ops="^infobatch$", dtypes=DTYPES, profile="quick")
    assert {r.verdict for r in runner.run(_GivenDraws(), planned, profile="quick")} == {"PASS"}
    wrong = runner.run(_RescalesByR(), planned, profile="quick", diagnose_fail=False)
    # (At r = 1/2, 1/r = 1/(1 - r): the mistake is invisible.  In half precision a draw or a
    # score within rounding of its threshold makes a differing result MISTRUSTED.)
    changed = [r for r in wrong if r.hparams["prune_ratio"] != 0.5]
    assert changed and all(r.verdict == "FAIL" for r in changed if r.dtype in ("float64", "float32")), \
        [(r.id, r.verdict) for r in changed]
    assert all(r.verdict in ("FAIL", "MISTRUSTED") for r in changed)


def test_an_adapter_drawing_its_own_is_checked_in_distribution():
    planned = runner.plan(_OwnDraws(), ops="^infobatch$", dtypes=("float64", "float16"),
                          profile="quick")
    results = runner.run(_OwnDraws(), planned, profile="quick")
    assert {r.verdict for r in results} == {"PASS"}, [(r.id, r.message) for r in results]
    assert all(r.steps == runner.PROFILES["quick"].draw_samples and "mean(outputs.weights)" in r.message
               for r in results)
    biased = runner.run(_ForgetsTheRescale(), planned, profile="quick", diagnose_fail=False)
    assert all(r.verdict == "FAIL" for r in biased), [(r.id, r.verdict, r.message) for r in biased]


def test_the_distributional_threshold_is_hoeffdings():
    """t = R sqrt(ln(2 m / alpha) / (2 M)) + K u |extreme|: at R = 2, m = 64, M = 400, float64."""
    t = distributional.threshold(np.array([0.0]), np.array([2.0]), 400, 64, "float64")
    expected = 2.0 * math.sqrt(math.log(2 * 64 / distributional.FALSE_ALARM) / 800) + 4 * 2.0**-53 * 2.0
    assert t[0] == pytest.approx(expected, rel=1e-15)
