"""Ranger21 (reference/optimizers/ranger21.py, spec ranger21).

(1) every component alone equals its standalone definition (Adam from reference.optimizers.adam
plus the component written out here), the official code's deviations (bug_compatible) as
properties, hypothesis invariants of the pieces; (2) float64 trajectories against
pytorch_optimizer.Ranger21 (both its paths) and, when importable, the official ranger21 package;
(3) a bad state (other bad input: the spec's [[error_cases]]).
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optim_helpers as oh
import reference
from reference.optimizers import adam as A
from reference.optimizers import clipping as C
from reference.optimizers import ranger21 as R

SHAPES = {"conv/weight": (8, 3, 3, 3), "conv1d/weight": (4, 6, 5), "fc/weight": (10, 16),
          "fc/bias": (10,), "tiny": (2,)}
LAST = "tiny"
STEPS = 12
LRS = [1e-2] * 6 + [4e-3] * 6
#: Every component off: plain Adam (AdamW with weight_decay and stable_decay=False).
OFF = dict(weight_decay=0.0, warmup=False, warmdown=False, agc=False, gradient_centralization=False,
           gradient_normalization=False, pnm=False, amsgrad=False, softplus=False, norm_loss=False,
           lookahead=False)
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def _problem(seed=0, steps=STEPS):
    rng = np.random.default_rng(seed)
    w0 = oh.tree(rng, SHAPES)
    grads = [oh.tree(rng, SHAPES, 3.0 if i % 3 == 0 else 0.02) for i in range(steps)]
    return w0, grads


def _ranger(w0, grads, lrs=LRS, **hp):
    return oh.trajectory(R, w0, grads, lrs, **hp)[-1]


def _adam(w0, grads, lrs=LRS, transform=None, before=None, after=None, **hp):
    """Reference Adam; ``transform(w, g)`` edits the gradient, ``before(w, g, state, t, lr)`` the
    weights before the step, ``after(w, t)`` the weights after it."""
    state = A.init(w0, **hp)
    w = dict(w0)
    for t, (lr, g) in enumerate(zip(lrs, grads, strict=True), start=1):
        if transform is not None:
            g = transform(w, g)
        if before is not None:
            w = before(w, g, state, t, lr)
        w, state = A.step(w, g, state, lr=lr, **hp)
        if after is not None:
            w = after(w, t)
    return w


# ------------------------------------------------------------------------------------------
# (1) each component alone is its definition
# ------------------------------------------------------------------------------------------


@pytest.mark.checks("all_components_off_equals_adamw")
def test_all_components_off_is_adamw():
    w0, grads = _problem()
    got, _ = _ranger(w0, grads, **{**OFF, "weight_decay": 0.05, "stable_decay": False})
    state = A.init_adamw(w0)
    w = dict(w0)
    for lr, g in zip(LRS, grads, strict=True):
        w, state = A.step_adamw(w, g, state, lr=lr, weight_decay=0.05)
    assert oh.rel_elementwise(got, w) < 1e-14


@pytest.mark.checks("agc_alone_equals_adam_on_clipped_gradient")
def test_agc_alone_is_adam_on_clipped_gradient():
    w0, grads = _problem(1)
    got, _ = _ranger(w0, grads, **{**OFF, "agc": True, "agc_clipping_value": 0.05})
    want = _adam(w0, grads, transform=lambda w, g: C.adaptive_grad_clip(w, g, clipping=0.05, eps=1e-3))
    assert oh.rel_elementwise(got, want) < 1e-14


def _centralize(g, conv_only=False):
    if g.ndim <= (3 if conv_only else 1):
        return g
    return g - g.mean(axis=tuple(range(1, g.ndim)), keepdims=True)


def _normalize(g):
    return g / (np.std(g, ddof=1) + 1e-8) if g.size > 2 else g


@pytest.mark.checks("centralization_alone_equals_adam_on_centralized_gradient")
@pytest.mark.parametrize("conv_only", [False, True])
def test_centralization_alone_is_adam_on_centralized_gradient(conv_only):
    w0, grads = _problem(2)
    got, _ = _ranger(w0, grads, **{**OFF, "gradient_centralization": True, "gc_conv_only": conv_only})
    want = _adam(w0, grads, transform=lambda w, g: {k: _centralize(v, conv_only) for k, v in g.items()})
    assert oh.rel_elementwise(got, want) < 1e-12


@pytest.mark.checks("normalization_alone_equals_adam_on_normalized_gradient")
def test_normalization_alone_is_adam_on_normalized_gradient():
    w0, grads = _problem(3)
    got, _ = _ranger(w0, grads, **{**OFF, "gradient_normalization": True})
    want = _adam(w0, grads, transform=lambda w, g: {k: _normalize(v) for k, v in g.items()})
    assert oh.rel_elementwise(got, want) < 1e-12


@pytest.mark.checks("amsgrad_alone_equals_adam_amsgrad")
def test_amsgrad_alone_is_adam_amsgrad():
    w0, grads = _problem(4)
    got, state = _ranger(w0, grads, **{**OFF, "amsgrad": True})
    want = _adam(w0, grads, amsgrad=True)
    assert oh.rel_elementwise(got, want) < 1e-14
    assert all(np.all(state["max_variance_ma"][k] >= state["variance_ma"][k]) for k in SHAPES)


def _adam_by_hand(w0, grads, lrs=LRS, *, denom_fn=lambda d: d, momentum="adam", beta0=1.0,
                  decay=None, norm_loss=0.0):
    """Adam written out with numpy, with the optional Ranger21 pieces inline."""
    w = dict(w0)
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    m_other = {k: np.zeros(s) for k, s in SHAPES.items()}
    v = {k: np.zeros(s) for k, s in SHAPES.items()}
    for t, (lr, g) in enumerate(zip(lrs, grads, strict=True), start=1):
        bc1, bc2 = 1 - BETA1**t, 1 - BETA2**t
        v = {k: BETA2 * v[k] + (1 - BETA2) * g[k] ** 2 for k in SHAPES}
        n_all = sum(x.size for x in v.values())
        vnorm = math.sqrt(sum(float(np.sum(x / bc2)) for x in v.values()) / n_all)
        new = {}
        for k in SHAPES:
            x = w[k]
            if decay is not None:
                x = x * (1 - decay * lr / vnorm)
            if norm_loss:
                un = np.sqrt(np.sum(x**2, axis=tuple(range(1, x.ndim)), keepdims=True)) if x.ndim > 1 \
                    else np.linalg.norm(x)
                x = x * (1 - lr * 2 * norm_loss * (1 - 1 / (un + EPS)))
            if momentum == "adam":
                m[k] = BETA1 * m[k] + (1 - BETA1) * g[k]
                direction = m[k]
            else:  # positive-negative momentum: the buffer of this parity, then the combination
                active, passive = (m, m_other) if t % 2 == 1 else (m_other, m)
                active[k] = BETA1**2 * active[k] + (1 - BETA1**2) * g[k]
                direction = ((1 + beta0) * active[k] - beta0 * passive[k]) / math.hypot(1 + beta0, beta0)
            denom = denom_fn(np.sqrt(v[k] / bc2) + EPS)
            new[k] = x - lr / bc1 * direction / denom
        w = new
    return w


@pytest.mark.checks("softplus_alone_equals_softplus_denominator")
def test_softplus_alone_is_softplus_of_the_denominator():
    w0, grads = _problem(5)
    for form in ("exact", "torch"):
        got, _ = _ranger(w0, grads, **{**OFF, "softplus": True, "beta_softplus": 50.0, "softplus_form": form})
        want = _adam_by_hand(w0, grads, denom_fn=lambda d: np.logaddexp(0.0, 50.0 * d) / 50.0)
        # torch's threshold (identity above beta x = 20) moves the result by <= exp(-20)/50 per denominator
        assert oh.rel_elementwise(got, want) < (1e-12 if form == "exact" else 1e-8)


@pytest.mark.checks("pnm_alone_equals_two_buffer_definition")
def test_pnm_alone_is_the_two_buffer_definition():
    w0, grads = _problem(6)
    for beta0 in (1.0, 0.4):
        got, _ = _ranger(w0, grads, **{**OFF, "pnm": True, "pnm_momentum_factor": beta0})
        want = _adam_by_hand(w0, grads, momentum="pnm", beta0=beta0)
        assert oh.rel_elementwise(got, want) < 1e-12


def test_stable_decay_alone_divides_by_sqrt_mean_vhat():
    w0, grads = _problem(7)
    got, _ = _ranger(w0, grads, **{**OFF, "weight_decay": 0.3})
    want = _adam_by_hand(w0, grads, decay=0.3)
    assert oh.rel_elementwise(got, want) < 1e-12
    plain = _adam_by_hand(w0, grads)
    assert oh.rel_elementwise(want, plain) > 1e-6  # the decay did something


@pytest.mark.checks("norm_loss_alone_equals_unit_norm_gradient_step")
def test_norm_loss_alone_is_the_unit_norm_gradient_step():
    w0, grads = _problem(8)
    got, _ = _ranger(w0, grads, **{**OFF, "norm_loss": True, "norm_loss_factor": 0.05})
    want = _adam_by_hand(w0, grads, norm_loss=0.05)
    assert oh.rel_elementwise(got, want) < 1e-12


@pytest.mark.checks("lookahead_alone_equals_adam_plus_lookahead")
def test_lookahead_alone_is_adam_plus_lookahead():
    w0, grads = _problem(9, steps=13)
    lrs = LRS + [LRS[-1]]
    for k, alpha in ((5, 0.5), (3, 0.8)):
        got, _ = _ranger(w0, grads, lrs, **{**OFF, "lookahead": True, "lookahead_k": k, "lookahead_alpha": alpha})
        slow = {"w": dict(w0)}

        def after(w, t, k=k, alpha=alpha, slow=slow):
            if t % k:
                return w
            merged = {p: alpha * x + (1 - alpha) * slow["w"][p] for p, x in w.items()}
            slow["w"] = merged
            return merged

        assert oh.rel_elementwise(got, _adam(w0, grads, lrs, after=after)) < 1e-14


@pytest.mark.checks("schedule_alone_equals_adam_with_warmup_warmdown_lr")
def test_schedule_alone_is_adam_with_warmup_and_warmdown():
    n, base, min_lr = 20, 1e-2, 3e-5
    w0, grads = _problem(10, steps=n)
    # beta2 = 0.999: 2/(1 - beta2) = 2000 > 45% of 20, so W = int(0.22 * 20) = 4; warm-down from int(0.72 * 20) = 14
    expected = [base * t / 4 for t in range(1, 5)] + [base] * 9 + \
        [base - (base - min_lr) * (t + 1 - 14) / (20 - 14 + 1) for t in range(14, 21)]
    assert expected[-1] == pytest.approx(min_lr, rel=1e-12)
    got, _ = _ranger(w0, grads, [base] * n, **{**OFF, "warmup": True, "warmdown": True, "num_iterations": n})
    assert oh.rel_elementwise(got, _adam(w0, grads, expected)) < 1e-14
    # an explicit W, and the long-run rule W = ceil(2 / (1 - beta2))
    assert R.ranger21_lr(1.0, 3, beta2=0.999, num_iterations=100, warmup=True, warmup_iterations=6,
                         warmup_pct_default=0.22, warmdown=False, warmdown_start_pct=0.72, warmdown_min_lr=0.0) == 0.5
    assert R.warmup_length(10**6, 0.999, None, 0.22) == math.ceil(2 / (1 - 0.999))


# ------------------------------------------------------------------------------------------
# The official code's deviations (bug_compatible)
# ------------------------------------------------------------------------------------------


@pytest.mark.checks("bug_compatible_decays_only_last_parameter")
def test_bug_a_decay_and_norm_loss_only_on_the_last_parameter():
    w0, grads = _problem(11)
    hp = {**OFF, "weight_decay": 0.3, "norm_loss": True, "norm_loss_factor": 0.05}
    bug, _ = _ranger(w0, grads, **hp, bug_compatible=True)
    paper, _ = _ranger(w0, grads, **hp)
    plain = _adam(w0, grads)
    for k in SHAPES:
        if k == LAST:
            assert oh.rel_elementwise({k: bug[k]}, {k: paper[k]}) < 1e-14
        else:
            assert oh.rel_elementwise({k: bug[k]}, {k: plain[k]}) < 1e-14
            assert oh.rel_elementwise({k: paper[k]}, {k: plain[k]}) > 1e-6
    # with decay alone the bug is a one-parameter mask
    only_last = {**OFF, "weight_decay": 0.3}
    masked, _ = _ranger(w0, grads, **only_last, weight_decay_mask=lambda path, x: path == LAST)
    assert oh.rel_elementwise(_ranger(w0, grads, **only_last, bug_compatible=True)[0], masked) < 1e-15


@pytest.mark.checks("bug_compatible_ignores_pnm_factor")
def test_bug_b_c_beta2_noise_norm_and_beta0_fixed_to_one():
    w0, grads = _problem(12)
    hp = {**OFF, "pnm": True}
    bug, _ = _ranger(w0, grads, **hp, bug_compatible=True, pnm_momentum_factor=0.3)
    bug1, _ = _ranger(w0, grads, **hp, bug_compatible=True, pnm_momentum_factor=1.0)
    for k in SHAPES:
        np.testing.assert_array_equal(bug[k], bug1[k])  # (c): the factor is ignored
    paper, _ = _ranger(w0, grads, **hp, pnm_momentum_factor=1.0)
    # (b): every step is the paper's with beta0 = 1 times sqrt(5) / sqrt((1 + beta2)^2 + beta2^2)
    ratio = math.sqrt(5.0) / math.hypot(1 + BETA2, BETA2)
    for k in SHAPES:
        np.testing.assert_allclose(bug[k] - w0[k], ratio * (paper[k] - w0[k]), rtol=1e-11, atol=1e-15)


@pytest.mark.checks("bug_compatible_amsgrad_is_noop")
def test_bug_d_amsgrad_is_a_noop():
    w0, grads = _problem(13)
    with_max, state = _ranger(w0, grads, **{**OFF, "amsgrad": True}, bug_compatible=True)
    without, _ = _ranger(w0, grads, **OFF, bug_compatible=True)
    assert oh.rel_elementwise(with_max, without) == 0.0
    assert all(not np.any(state["max_variance_ma"][k]) for k in SHAPES)
    real, _ = _ranger(w0, grads, **{**OFF, "amsgrad": True})
    assert oh.rel_elementwise(real, without) > 1e-6


def test_bug_e_preprocessing_twice():
    w0, grads = _problem(14)
    hp = {**OFF, "gradient_centralization": True, "gradient_normalization": True}
    bug, _ = _ranger(w0, grads, **hp, bug_compatible=True)
    twice, _ = _ranger(w0, grads, **hp, preprocess_twice=True)
    once, _ = _ranger(w0, grads, **hp)
    assert oh.rel_elementwise(bug, twice) == 0.0
    # the second normalization divides by std(g') + 1e-8 = (s + 2e-8) / (s + 1e-8): a small but real change
    assert 0.0 < oh.rel_elementwise(twice, once) < 1e-3


# ------------------------------------------------------------------------------------------
# Hypothesis: invariants of the pieces
# ------------------------------------------------------------------------------------------

seeds = st.integers(0, 2**32 - 1)


@pytest.mark.checks("centralized_gradient_rows_sum_to_zero")
@given(seed=seeds, log_scale=st.floats(-8, 8), conv_only=st.booleans())
def test_centralized_gradient_units_sum_to_zero(seed, log_scale, conv_only):
    rng = np.random.default_rng(seed)
    for shape in SHAPES.values():
        g = 10.0**log_scale * (rng.standard_normal(shape) + 3.0)
        c = R.centralize_gradient(g, conv_only=conv_only)
        if g.ndim > (3 if conv_only else 1):
            axes = tuple(range(1, g.ndim))
            assert np.all(np.abs(c.sum(axis=axes)) <= 1e-12 * np.abs(g).sum(axis=axes))
            np.testing.assert_allclose(R.centralize_gradient(c, conv_only=conv_only), c, atol=1e-13 * np.abs(g).max())
        else:
            assert c is g
        n = R.normalize_gradient(g)
        if g.size > 2:
            s = np.std(g, ddof=1)
            assert np.std(n, ddof=1) == pytest.approx(s / (s + 1e-8), rel=1e-12)


@given(x=st.floats(-50, 50), beta=st.floats(0.1, 100))
def test_softplus_bounds(x, beta):
    exact = float(R.softplus(np.asarray(x), beta))
    assert exact >= max(x, 0.0) * (1 - 2e-16) and exact - max(x, 0.0) <= math.log(2.0) / beta * (1 + 1e-15)
    assert exact == pytest.approx(float(np.logaddexp(0.0, beta * x)) / beta, rel=1e-14, abs=1e-300)
    torch_form = float(R.softplus(np.asarray(x), beta, "torch"))
    assert abs(torch_form - exact) <= math.exp(-20.0) / beta


@given(n=st.integers(1, 5000), lr=st.floats(1e-5, 1.0), beta2=st.sampled_from([0.9, 0.99, 0.999]))
def test_schedule_is_bounded_and_ends_at_min_lr(n, lr, beta2):
    kw = dict(beta2=beta2, num_iterations=n, warmup=True, warmup_iterations=None, warmup_pct_default=0.22,
              warmdown=True, warmdown_start_pct=0.72, warmdown_min_lr=3e-5)
    lrs = [R.ranger21_lr(lr, t, **kw) for t in range(1, n + 1)]
    assert all(0.0 < x <= max(lr, 3e-5) * (1 + 1e-15) for x in lrs)
    assert lrs[-1] == pytest.approx(3e-5, rel=1e-9)
    start = int(0.72 * n)
    tail = lrs[max(start - 1, 0):]
    assert all(a >= b - 1e-18 for a, b in zip(tail, tail[1:], strict=False)) or lr < 3e-5


# ------------------------------------------------------------------------------------------
# (2) float64 trajectories against the implementations
# ------------------------------------------------------------------------------------------

PO_DIALECT = dict(preprocess_twice=True, variance_sum_init=1.0, unit_layout="out_first_3d_dim1",
                  softplus_form="torch", agc_compare_guarded=True, pnm_momentum_factor=0.9)
N_RUN = 20
# base lr 1e-2, lowered in the middle of the run and restored at the warm-down start (both
# libraries warm down from the constructor's lr)
LR_RUN = [1e-2] * 7 + [5e-3] * 6 + [1e-2] * 7


def _torch_trajectory(make_opt, seed):
    pytest.importorskip("torch")
    w0, grads = _problem(seed, steps=N_RUN)
    tensors = oh.torch_tensors(w0)
    opt = make_opt(list(tensors.values()))
    with contextlib.redirect_stdout(io.StringIO()):
        steps = oh.torch_steps(opt, tensors, grads, LR_RUN)
    return w0, grads, steps[-1][0]


@pytest.mark.parametrize("foreach", [False, True])
def test_pytorch_optimizer_ranger21(foreach):
    po = pytest.importorskip("pytorch_optimizer")
    hp = dict(num_iterations=N_RUN, weight_decay=1e-2, norm_loss_factor=1e-2)
    w0, grads, got = _torch_trajectory(
        lambda ps: po.Ranger21(ps, lr=LR_RUN[0], foreach=foreach, **hp), seed=20)
    want, _ = _ranger(w0, grads, LR_RUN, **hp, **PO_DIALECT)
    assert oh.rel_elementwise(got, want) < 1e-12
    # the paper semantics is measurably different (variance sum, 3-D units, beta0, ...)
    paper, _ = _ranger(w0, grads, LR_RUN, **hp, pnm_momentum_factor=0.9)
    assert oh.rel_elementwise(paper, want) > 1e-6


def _import_official(monkeypatch):
    """The official package (PyPI ranger21 0.1.0); it imports matplotlib only for plotting, so a
    stub stands in (for this test only) where matplotlib is not installed."""
    import importlib.util

    pytest.importorskip("torch")
    if importlib.util.find_spec("ranger21") is None:
        pytest.skip("the official ranger21 package is not installed")
    if importlib.util.find_spec("matplotlib") is None:
        stub = types.ModuleType("matplotlib")
        stub.pyplot = types.ModuleType("matplotlib.pyplot")
        monkeypatch.setitem(sys.modules, "matplotlib", stub)
        monkeypatch.setitem(sys.modules, "matplotlib.pyplot", stub.pyplot)
        monkeypatch.delitem(sys.modules, "ranger21", raising=False)
        monkeypatch.delitem(sys.modules, "ranger21.ranger21", raising=False)
    import ranger21

    return ranger21


def test_official_ranger21_is_bug_compatible(monkeypatch):
    ranger21 = _import_official(monkeypatch)
    hp = dict(weight_decay=1e-2, norm_loss_factor=1e-2, pnm_momentum_factor=0.3)

    def make(ps):
        with contextlib.redirect_stdout(io.StringIO()):
            return ranger21.Ranger21(ps, lr=LR_RUN[0], num_epochs=N_RUN, num_batches_per_epoch=1,
                                     weight_decay=hp["weight_decay"], normloss_factor=hp["norm_loss_factor"],
                                     pnm_momentum_factor=hp["pnm_momentum_factor"])

    w0, grads, got = _torch_trajectory(make, seed=21)
    want, _ = _ranger(w0, grads, LR_RUN, num_iterations=N_RUN, bug_compatible=True,
                      unit_layout="out_first_3d_dim1", softplus_form="torch", **hp)
    assert oh.rel_elementwise(got, want) < 1e-12


# ------------------------------------------------------------------------------------------
# Harness form, float32 raw function, bad input
# ------------------------------------------------------------------------------------------


def test_harness_form_round_trips_the_flat_state():
    op = reference.get("ranger21")
    w0, grads = _problem(30, steps=6)
    hp = dict(num_iterations=6, **PO_DIALECT)
    state = None
    w = dict(w0)
    for g in grads:
        out, state = op.apply(oh.flat(w, g), state, lr=1e-2, **hp)
        w = {k: out[f"params/{k}"] for k in SHAPES}
    assert float(state["step"]) == 6.0 and "lookahead_params/tiny" in state
    want, _ = _ranger(w0, grads, [1e-2] * 6, **hp)
    assert oh.rel_elementwise(w, want) == 0.0


def test_raw_function_keeps_float32():
    w0, grads = _problem(31, steps=3)
    w = {k: v.astype(np.float32) for k, v in w0.items()}
    state = R.init.__wrapped__(w)
    for g in grads:
        w, state = R.step.__wrapped__(w, {k: v.astype(np.float32) for k, v in g.items()}, state, lr=1e-2)
    assert all(v.dtype == np.float32 for v in w.values())


# The rest of the bad input is the spec's [[error_cases]]; this one needs a specific state.
def test_state_built_with_other_switches_is_refused():
    w0, grads = _problem(33, steps=1)
    state = R.init(w0, pnm=False)
    with pytest.raises(ValueError, match="neg_grad_ma"):
        R.step(w0, grads[0], state, pnm=True)
