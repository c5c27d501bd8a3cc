"""SGD (reference/optimizers/sgd.py): the invariants of A1, float64 trajectories against torch.optim.SGD
and optax.sgd, Goyal's momentum correction, parameter groups, the pytree API and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optim_helpers as oh
import reference
from reference.optimizers import param_groups, sgd

LRS = [0.05 * m for m in oh.LR_MULTIPLIERS]


@pytest.mark.checks("nesterov_mu0_equals_sgd", "momentum0_is_gradient_descent")
@given(seed=st.integers(0, 2**16), lr=st.floats(1e-4, 1.0), wd=st.sampled_from([0.0, 1e-3, 0.1]))
def test_nesterov_with_mu_0_and_momentum_0_are_gradient_descent(seed, lr, wd):
    rng = np.random.default_rng(seed)
    params, grads = oh.tree(rng), oh.tree(rng)
    plain = {p: w - lr * (grads[p] + wd * w) for p, w in params.items()}
    for hp in ({}, {"nesterov": True}):
        new, _ = sgd.step(params, grads, sgd.init(params), lr=lr, weight_decay=wd, **hp)
        assert oh.rel(new, plain) < 1e-15


@given(seed=st.integers(0, 2**16), mu=st.floats(0.1, 0.99), nesterov=st.booleans())
def test_lr_inside_equals_outside_under_a_constant_lr(seed, mu, nesterov):
    params, grads = oh.tree(np.random.default_rng(seed)), oh.gradients(seed, 6)
    lrs = [0.03] * 6
    outside = oh.oracle_run("sgd", params, grads, lrs, momentum=mu, nesterov=nesterov)
    inside = oh.oracle_run("sgd", params, grads, lrs, momentum=mu, nesterov=nesterov, lr_placement="inside")
    assert oh.worst(inside, outside) < 1e-12


@pytest.mark.checks("lr_inside_differs_by_correction_after_change", "momentum_correction_restores_outside")
@given(seed=st.integers(0, 2**16), mu=st.floats(0.1, 0.99), ratio=st.floats(0.05, 5.0))
def test_after_an_lr_change_inside_differs_by_the_correction_and_the_correction_restores_it(seed, mu, ratio):
    """Goyal et al. Eq. 9-10: one step after eta1 -> eta2 the lr-inside update differs from the
    lr-outside one by exactly mu (eta1 - eta2) b_prev; with the correction they agree."""
    rng = np.random.default_rng(seed)
    params, grads = oh.tree(rng), oh.gradients(seed, 4)
    lrs = [0.03, 0.03, 0.03, 0.03 * ratio]
    outside = oh.oracle_run("sgd", params, grads, lrs, momentum=mu)
    inside = oh.oracle_run("sgd", params, grads, lrs, momentum=mu, lr_placement="inside")
    corrected = oh.oracle_run("sgd", params, grads, lrs, momentum=mu, lr_placement="inside",
                              momentum_correction=True)
    assert oh.worst(corrected, outside) < 1e-12
    assert oh.worst(inside[:3], outside[:3]) < 1e-12
    # b_prev: the lr-outside buffer after step 3
    state = sgd.init(params, momentum=mu)
    p = params
    for g in grads[:3]:
        p, state = sgd.step(p, g, state, lr=0.03, momentum=mu)
    b_prev = state["momentum_buffer"]
    for path in params:
        diff = outside[3][path] - inside[3][path]
        np.testing.assert_allclose(diff, mu * (0.03 - 0.03 * ratio) * b_prev[path],
                                   rtol=1e-8, atol=1e-13 * np.max(np.abs(params[path])))


def test_first_step_clone_vs_zeros_differ_only_with_dampening():
    rng = np.random.default_rng(1)
    params, g = oh.tree(rng), oh.tree(rng)
    for tau in (0.0, 0.3):
        clone, _ = sgd.step(params, g, sgd.init(params, momentum=0.9), lr=0.1, momentum=0.9, dampening=tau)
        zeros, _ = sgd.step(params, g, sgd.init(params, momentum=0.9), lr=0.1, momentum=0.9,
                            dampening=tau, first_step="zeros")
        assert (oh.rel(clone, zeros) == 0.0) == (tau == 0.0)


@pytest.mark.parametrize("hp", [
    {"momentum": 0.9, "weight_decay": 1e-2},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    {"momentum": 0.8, "dampening": 0.3},
    {"momentum": 0.0, "weight_decay": 1e-2},
], ids=["momentum", "nesterov", "dampening", "plain"])
def test_float64_trajectory_matches_torch_sgd(hp):
    torch = pytest.importorskip("torch")
    params, grads = oh.tree(np.random.default_rng(2)), oh.gradients(3)
    expected = oh.oracle_run("sgd", params, grads, LRS, **hp)
    got = oh.torch_run(lambda groups: torch.optim.SGD(groups, lr=LRS[0], foreach=False, **hp),
                       params, grads, LRS)
    assert oh.worst(got, expected) < 1e-13


def test_masked_decay_matches_torch_parameter_groups():
    torch = pytest.importorskip("torch")
    params, grads = oh.tree(np.random.default_rng(4)), oh.gradients(5)
    expected = oh.oracle_run("sgd", params, grads, LRS, momentum=0.9, weight_decay=0.1,
                             weight_decay_mask="ndim>=2")

    def groups(tensors):
        return [{"params": [t for p, t in tensors.items() if t.ndim >= 2]},
                {"params": [t for p, t in tensors.items() if t.ndim < 2], "weight_decay": 0.0}]

    got = oh.torch_run(lambda g: torch.optim.SGD(g, lr=LRS[0], momentum=0.9, weight_decay=0.1,
                                                 foreach=False), params, grads, LRS, groups)
    assert oh.worst(got, expected) < 1e-13


@pytest.mark.parametrize("nesterov", [False, True])
def test_float64_trajectory_matches_optax_sgd(nesterov):
    pytest.importorskip("optax")
    import optax

    params, grads = oh.tree(np.random.default_rng(6)), oh.gradients(7)
    expected = oh.oracle_run("sgd", params, grads, LRS, momentum=0.9, nesterov=nesterov,
                             weight_decay=1e-2, first_step="zeros")
    got = oh.optax_run(lambda lr: optax.chain(optax.add_decayed_weights(1e-2),
                                              optax.sgd(lr, momentum=0.9, nesterov=nesterov)),
                       params, grads, LRS)
    assert oh.worst(got, expected) < 1e-13


def test_param_groups_step_each_group_with_its_own_hyper_parameters():
    """torch's per-group lr: biases and norms at 10x the lr, no decay."""
    torch = pytest.importorskip("torch")
    params, grads = oh.tree(np.random.default_rng(8)), oh.gradients(9, 4)
    grouped = param_groups(sgd.step, [("ndim>=2", {}), ("all", {"lr": 0.5, "weight_decay": 0.0})])
    state = sgd.init(params, momentum=0.9)
    p = params
    expected = []
    for g in grads:
        p, state = grouped(p, g, state, lr=0.05, momentum=0.9, weight_decay=1e-2)
        expected.append(p)

    def groups(tensors):
        return [{"params": [t for t in tensors.values() if t.ndim >= 2]},
                {"params": [t for t in tensors.values() if t.ndim < 2], "lr": 0.5, "weight_decay": 0.0}]

    got = oh.torch_run(lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, weight_decay=1e-2, foreach=False),
                       params, grads, [0.05] * 4, groups)
    assert oh.worst(got, expected) < 1e-13
    with pytest.raises(ValueError, match="no group selects"):
        param_groups(sgd.step, [("ndim>=2", {})])(params, grads[0], sgd.init(params), lr=0.1)


def test_nested_pytrees_come_back_nested_and_inputs_are_not_modified():
    rng = np.random.default_rng(10)
    params = {"block": {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(3)}}
    grads = {"block": {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(3)}}
    before = {k: v.copy() for k, v in params["block"].items()}
    state = sgd.init(params, momentum=0.9)
    new, state = sgd.step(params, grads, state, lr=0.1, momentum=0.9)
    assert set(new) == {"block"} and set(new["block"]) == {"w", "b"}
    assert set(state["momentum_buffer"]["block"]) == {"w", "b"}
    assert all(np.array_equal(params["block"][k], before[k]) for k in before)
    np.testing.assert_allclose(new["block"]["w"], before["w"] - 0.1 * grads["block"]["w"])


def test_float32_inputs_are_promoted_and_the_harness_form_works():
    params = {"w": np.ones((2, 2), np.float32)}
    new, _ = sgd.step(params, {"w": np.ones((2, 2), np.float32)}, sgd.init(params), lr=0.5)
    assert new["w"].dtype == np.float64
    op = reference.get("sgd")
    out, state = op.apply({"params/w": np.ones(3), "grads/w": np.ones(3)}, None, lr=0.5, momentum=0.9)
    np.testing.assert_array_equal(out["params/w"], np.full(3, 0.5))
    assert set(state) == {"step", "momentum_buffer/w"}


# Bad hyper-parameters and misshapen or mispathed grads: [[error_cases]] in
# specs/optimizers/sgd.toml (tests/test_error_cases.py).  Kept here: what an error case cannot
# give (params that are not a dict, a non-float parameter dtype, a specific state).
def test_bad_trees_name_the_argument():
    params = {"w": np.ones(3)}
    with pytest.raises(TypeError, match="params must be a non-empty dict"):
        sgd.step([np.ones(3)], {"w": np.ones(3)}, {})
    with pytest.raises(TypeError, match="must have a real floating dtype"):
        sgd.step({"w": np.ones(3, dtype=np.int64) > 0}, {"w": np.ones(3)}, sgd.init(params))
    with pytest.raises(TypeError, match="unknown state slot 'velocity'"):
        sgd.step(params, {"w": np.ones(3)}, {"velocity": {"w": np.ones(3)}})
