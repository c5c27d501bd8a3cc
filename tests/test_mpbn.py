"""MPBN (reference/normalizers/mpbn.py), a stream op: one LIF time step with a BatchNorm on the
membrane potential.

(1) accuracy: potentials, spikes and the carried potential over a short sequence against 50-digit
arithmetic on the adversarial families; (2) the paper's and the official code's statements as
properties: the LIF recurrence with its hard reset, one BatchNorm shared by the time steps, the
strict threshold at V_th / 2, the inference fold into a per-channel threshold (gamma of either
sign, and 0), the official surrogate derivative; the official LIFAct restated in float64 torch;
(3) the stream harness: the same-precision baseline passes every dtype, and a soft reset in
place of the hard one is flagged while the control is not.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from conformance import runner
from conformance.adapters import OpSupport
from conformance.adapters.numpy32 import NumPy32Adapter
from conformance.cases import ADVERSARIAL, adversarial
from helpers import (
    MIN_FLAGGED,
    flagged_cases,
    mp,
    mp_array,
    mp_mean,
    mp_sqrt,
    mp_var,
    relative_error,
    run_mutant,
    t64,
    torch_or_skip,
    verdict_table,
)
from mutants import Control, Mutant
from reference.normalizers.mpbn import fire_folded, fold_threshold, spike_surrogate_grad

OP = reference.get("mpbn")
BN = reference.get("batch_norm")
RNG = np.random.default_rng(20260712)
DTYPES = ("float64", "float32", "float16", "bfloat16")


def _channel(v, ndim):
    return np.asarray(v).reshape((1, -1) + (1,) * (ndim - 2))


def run_sequence(xs, weight=None, bias=None, state=None, **hp):
    """The op over the time steps ``xs`` (state carried): per step outputs and the new state."""
    out = []
    for x in xs:
        inputs = {"x": x, "weight": weight, "bias": bias}
        outputs, state = OP.apply(inputs, state, **hp)
        out.append({**outputs, **{f"state.{k}": v for k, v in state.items()}})
    return out


# --------------------------------------------------------------------------------------------
# (1) accuracy
# --------------------------------------------------------------------------------------------


def mp_sequence(xs, weight, bias, eps, decay, v_th):
    """The LIF + MPBN recurrence at 50 digits (training: each step's batch statistics), written
    from the equations; returns per step (potential, spikes, carried potential)."""
    mpmath = mp()
    R = tuple(a for a in range(xs[0].ndim) if a != 1)
    w, b = _channel(mp_array(weight), xs[0].ndim), _channel(mp_array(bias), xs[0].ndim)
    m = mp_array(np.zeros_like(xs[0]))
    steps = []
    for x in xs:
        u = mpmath.mpf(float(decay)) * m + mp_array(x)
        pot = (u - mp_mean(u, R)) / mp_sqrt(mp_var(u, R) + mpmath.mpf(float(eps))) * w + b
        s = np.vectorize(lambda p: mpmath.mpf(1 if p / mpmath.mpf(float(v_th)) > 0.5 else 0), otypes=[object])(pot)
        m = u * (1 - s)
        steps.append((pot, s, m))
    return steps


@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_sequence_matches_mpmath_on_adversarial_data(family):
    """Three time steps of adversarial input currents (a fresh draw each step) with eps scaled to
    the data's spread: potentials to 1e-10 relative, the carried potential to 1e-14, the spikes
    identical (no potential lies within 1e-6 of the threshold here, checked)."""
    xs = [adversarial(family, (4, 3, 5), seed=t) for t in range(3)]
    weight, bias = 1 + 0.5 * RNG.standard_normal(3), 0.5 + 0.5 * RNG.standard_normal(3)
    var = float(np.mean(np.var(xs[0], axis=(0, 2))))
    eps = 1e-3 * var if var > 0 else 1e-5
    got = run_sequence(xs, weight, bias, eps=eps)
    for t, (pot, s, m) in enumerate(mp_sequence(xs, weight, bias, eps, 0.25, 1.0)):
        assert min(abs(float(p) - 0.5) for p in pot.ravel()) > 1e-6
        np.testing.assert_array_equal(got[t]["spikes"], s.astype(np.float64))
        assert relative_error(got[t]["potential"], pot) <= 1e-10, (family, t)
        assert relative_error(got[t]["state.membrane"], m) <= 1e-14, (family, t)


# --------------------------------------------------------------------------------------------
# (2) properties
# --------------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 5), decay=st.floats(0.0, 1.0),
       v_th=st.floats(0.2, 3.0))
def test_lif_recurrence_with_hard_reset(seed, steps, decay, v_th):
    """u_t = tau u_{t-1} (1 - s_{t-1}) + x_t (pre-reset potentials), s_t from the potential the op
    reports, and the carried potential u_t (1 - s_t): restated over a sequence."""
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((4, 2, 3)) for _ in range(steps)]
    got = run_sequence(xs, 1 + 0.5 * rng.standard_normal(2), rng.standard_normal(2), decay=decay, v_th=v_th)
    u_prev, s_prev = np.zeros((4, 2, 3)), np.zeros((4, 2, 3))
    for x, g in zip(xs, got, strict=True):
        u = decay * u_prev * (1 - s_prev) + x
        s = (g["potential"] / v_th > 0.5).astype(np.float64)
        np.testing.assert_array_equal(g["spikes"], s)
        np.testing.assert_allclose(g["state.membrane"], u * (1 - s), rtol=1e-15, atol=1e-15)
        u_prev, s_prev = u, s


@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 5), momentum=st.floats(0.0, 1.0),
       training=st.booleans())
def test_one_batch_norm_shared_by_the_time_steps(seed, steps, momentum, training):
    """The potential of every step is batch_norm of that step's u_t (its batch statistics in
    training), and the running statistics are those of one BatchNorm called once per step: T
    updates, num_batches_tracked = T (nothing moves in evaluation)."""
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((3, 2, 2)) + 0.5 for _ in range(steps)]
    w, b = 1 + 0.5 * rng.standard_normal(2), rng.standard_normal(2)
    got = run_sequence(xs, w, b, momentum=momentum, training=training)
    bn_state, membrane = None, np.zeros((3, 2, 2))
    for x, g in zip(xs, got, strict=True):
        u = 0.25 * membrane + x
        pot, bn_state = BN.apply({"x": u, "weight": w, "bias": b}, bn_state, momentum=momentum, training=training)
        np.testing.assert_allclose(g["potential"], pot["y"], rtol=1e-14, atol=1e-14)
        for k, v in bn_state.items():
            np.testing.assert_allclose(g[f"state.{k}"], v, rtol=1e-14, atol=1e-15)
        membrane = g["state.membrane"]
    assert float(got[-1]["state.num_batches_tracked"]) == (steps if training else 0)


@pytest.mark.parametrize("training", [True, False])
def test_fires_strictly_above_half_threshold(training):
    """With gamma = 0 the potential is beta exactly: a channel whose beta is V_th / 2 does not
    fire (torch.gt), the next float above it fires, in training and inference alike."""
    v_th = 1.5
    bias = np.array([0.75, np.nextafter(0.75, 1.0), np.nextafter(0.75, 0.0)])
    out, _ = OP.apply({"x": RNG.standard_normal((4, 3)), "weight": np.zeros(3), "bias": bias}, None,
                      v_th=v_th, training=training)
    np.testing.assert_array_equal(out["potential"], np.broadcast_to(bias, (4, 3)))
    np.testing.assert_array_equal(out["spikes"], np.broadcast_to([0.0, 1.0, 0.0], (4, 3)))


@given(seed=st.integers(0, 2**32 - 1), decay=st.floats(0.0, 1.0))
def test_reset_neurons_start_again_from_the_input(seed, decay):
    """A neuron that fired carries 0 (hard reset): its next potential is x_{t+1} exactly, and a
    neuron that did not fire carries u_t unchanged."""
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((5, 3)) for _ in range(3)]
    got = run_sequence(xs, decay=decay)
    for t in range(2):
        fired = got[t]["spikes"] == 1.0
        assert np.all(got[t]["state.membrane"][fired] == 0.0)
        u_next = got[t + 1]["state.membrane"] + 0.0  # carried after step t+1 where it did not fire
        quiet = got[t + 1]["spikes"] == 0.0
        np.testing.assert_array_equal(u_next[fired & quiet], xs[t + 1][fired & quiet])


@given(seed=st.integers(0, 2**32 - 1), training=st.booleans())
def test_zero_decay_forgets_the_past(seed, training):
    """tau = 0: the step depends on x_t alone, whatever potential is carried in (bit for bit)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 2, 3))
    fresh = OP.init_state({"x": x})
    carried = {**fresh, "membrane": 10 * rng.standard_normal((4, 2, 3))}
    a, sa = OP.apply({"x": x}, fresh, decay=0.0, training=training)
    b, sb = OP.apply({"x": x}, carried, decay=0.0, training=training)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])


@given(seed=st.integers(0, 2**32 - 1), v_th=st.floats(0.1, 4.0), decay=st.floats(0.0, 1.0))
def test_threshold_fold_reproduces_eval_spikes(seed, v_th, decay):
    """Inference: MPBN then the threshold equals the raw potential against the folded per-channel
    threshold V_th' = mu + (V_th/2 - beta) sigma / gamma, with the inequality turned round for
    gamma < 0 and a constant decision for gamma = 0 (channels of all three kinds).  The two
    computations round differently, so potentials within 1e-12 of the threshold are set aside
    (none on these draws)."""
    rng = np.random.default_rng(seed)
    c = 6
    weight = rng.standard_normal(c) * np.array([1, 1, -1, -1, 0, 0])
    weight[:2], weight[2:4] = np.abs(weight[:2]), -np.abs(weight[2:4])
    bias = v_th * np.array([0.1, 0.9, 0.2, -0.4, 0.6, 0.4])  # gamma = 0: fires, does not
    state = {"membrane": rng.standard_normal((5, c, 2)), "running_mean": rng.standard_normal(c),
             "running_var": 0.5 + rng.random(c), "num_batches_tracked": np.float64(7)}
    x = rng.standard_normal((5, c, 2))
    out, _ = OP.apply({"x": x, "weight": weight, "bias": bias}, state, training=False, v_th=v_th, decay=decay)
    u = decay * state["membrane"] + x
    folded = fold_threshold(weight, bias, state["running_mean"], state["running_var"], v_th=v_th)
    np.testing.assert_array_equal(folded["sign"], np.sign(weight))
    clear = np.abs(out["potential"] - 0.5 * v_th) > 1e-12 * max(1.0, v_th)
    assert clear.all()
    np.testing.assert_array_equal(fire_folded(u, folded)[clear], out["spikes"][clear])
    # The sign matters: the fold that ignores it (u > V_th' for every channel) is wrong where gamma < 0.
    naive = (u > _channel(folded["threshold"], 3)).astype(np.float64)
    assert not np.array_equal(naive[:, 2:4], out["spikes"][:, 2:4])


def test_surrogate_gradient_is_the_official_derivative():
    """spike_surrogate_grad is d/du~ of (tanh(k (clamp(u~/V_th, 0, 1) - 1/2)) + tanh(k/2)) /
    (2 tanh(k/2)): against torch autograd of that expression in float64 (the official
    spike_activation's backward), including the clamp's edges 0 and 1, where torch passes the
    gradient, and outside, where it is 0; against central differences inside."""
    torch = torch_or_skip()
    v_th, k = 0.8, 3.0
    pot = np.concatenate([RNG.uniform(-0.5, 1.5, 40) * v_th, [0.0, v_th, -1e-3, v_th + 1e-3]])
    pt = t64(pot, requires_grad=True)
    v = torch.clamp(pt / v_th, 0, 1)
    smooth = (torch.tanh(k * (v - 0.5)) + math.tanh(k / 2)) / (2 * math.tanh(k / 2))
    (grad,) = torch.autograd.grad(smooth.sum(), pt)
    mine = spike_surrogate_grad(pot, v_th=v_th, temp=k)
    np.testing.assert_allclose(mine, grad.numpy(), rtol=1e-14, atol=1e-16)
    assert mine[-4] > 0 and mine[-3] > 0 and mine[-2] == 0 and mine[-1] == 0
    inside = (pot > 0.01 * v_th) & (pot < 0.99 * v_th)

    def f(p):
        return (np.tanh(k * (np.clip(p / v_th, 0, 1) - 0.5)) + math.tanh(k / 2)) / (2 * math.tanh(k / 2))

    h = 1e-6
    np.testing.assert_allclose(mine[inside], (f(pot + h) - f(pot - h))[inside] / (2 * h), rtol=1e-8)


def _torch_lifact(torch, xs, weight, bias, *, training, eps=1e-5, momentum=0.1, decay=0.25, v_th=1.0,
                  buffers=None):
    """LIFAct.forward from its equations: u = 0, then per step u = decay u + x_t, one shared
    BatchNorm (F.batch_norm on the module's buffers), spike = [bn(u) / V_th > 0.5], u (1 - spike)."""
    F = torch.nn.functional
    u = torch.zeros_like(xs[0])
    out = []
    for x in xs:
        u = u * decay + x
        pot = F.batch_norm(u, buffers["running_mean"], buffers["running_var"], weight, bias, training,
                           momentum, eps)
        if training:
            buffers["num_batches_tracked"] += 1
        spike = torch.gt(pot / v_th, 0.5).to(pot.dtype)
        out.append((pot, spike, u * (1 - spike)))
        u = u * (1 - spike)
    return out


def test_official_lifact_matches():
    """Two forwards of four time steps (training, then inference with the statistics the first
    left) of the official LIFAct in float64 torch against the stream, state carried within a
    forward and the running statistics across them: potentials, spikes, carried potentials and
    buffers.  (models/spike_layer.py's own LIFAct, four forwards of four steps, agrees with the
    oracle to 3.1e-16 in the potential and 4.2e-16 in the buffers, with every spike equal.)"""
    torch = torch_or_skip()
    c = 3
    w, b = 1 + 0.5 * RNG.standard_normal(c), 0.3 + 0.5 * RNG.standard_normal(c)
    buffers = {"running_mean": t64(np.zeros(c)), "running_var": t64(np.ones(c)), "num_batches_tracked": 0}
    bn_state = None
    for training in (True, False):
        xs = [RNG.standard_normal((4, c, 2, 2)) for _ in range(4)]
        ref = _torch_lifact(torch, [t64(x) for x in xs], t64(w), t64(b), training=training, buffers=buffers)
        state = None if bn_state is None else {**OP.init_state({"x": xs[0]}), **bn_state}
        got = run_sequence(xs, w, b, state=state, training=training)
        for (pot, spike, carried), g in zip(ref, got, strict=True):
            np.testing.assert_allclose(g["potential"], pot.numpy(), rtol=1e-14, atol=1e-14)
            np.testing.assert_array_equal(g["spikes"], spike.numpy())
            np.testing.assert_allclose(g["state.membrane"], carried.numpy(), rtol=1e-14, atol=1e-15)
        bn_state = {k: got[-1][f"state.{k}"] for k in ("running_mean", "running_var", "num_batches_tracked")}
        for k in ("running_mean", "running_var"):
            np.testing.assert_allclose(bn_state[k], buffers[k].numpy(), rtol=1e-14)
        assert float(bn_state["num_batches_tracked"]) == buffers["num_batches_tracked"] == 4


# --------------------------------------------------------------------------------------------
# (3) the stream harness
# --------------------------------------------------------------------------------------------


class _Mpbn(NumPy32Adapter):
    name = "mpbn32"

    def ops(self):
        return {"mpbn": OpSupport({}, DTYPES, "test")}


def test_the_same_precision_baseline_passes_every_dtype_over_the_stream():
    """The oracle's formulas in each dtype, over free-running sequences: PASS, or MISTRUSTED where
    a spike flips within the dtype's rounding (the stream's state then jumps), never FAIL."""
    adapter = _Mpbn()
    planned = runner.plan(adapter, ops="^mpbn$", dtypes=DTYPES, profile="quick")
    results = runner.run(adapter, planned, profile="quick")
    assert {r.verdict for r in results} <= {"PASS", "MISTRUSTED"}, verdict_table(results)
    passed = {r.dtype for r in results if r.verdict == "PASS"}
    assert passed >= {"float64", "float32", "float16"}


class _Lif(Mutant):
    op = "mpbn"
    dtypes = ("float64",)  # the mistake does not depend on the rounding


class SoftReset(_Lif):
    """The reset subtracts the spike (``mem = mem - spike``, the line commented out in the
    official mem_update) instead of zeroing the un-normalized potential."""

    def forward(self, a, hp):
        out, state = self.oracle(a, hp)
        u = hp["decay"] * a["membrane"] + a["x"]
        return out, {**state, "membrane": u - out["spikes"]}


@pytest.mark.parametrize("cls", [SoftReset], ids=lambda c: c.__name__)
def test_mutants_are_flagged(cls):
    flagged, results = flagged_cases(cls())
    assert flagged >= MIN_FLAGGED, f"{cls.__name__} flagged by {flagged} cases:\n{verdict_table(results)}"


def test_the_unmutated_control_is_not_flagged():
    """The mutant's plumbing without a mistake: no FAIL, ERROR or CONVENTION."""
    _, results = run_mutant(Control(_Lif.op, _Lif.dialect, _Lif.dtypes))
    flagged = [r for r in results if r.verdict in ("FAIL", "ERROR", "CONVENTION")]
    assert not flagged, verdict_table(flagged)
