"""Adam / AdamW / AMSGrad (reference/optimizers/adam.py): the invariants of A2, float64 trajectories
against torch.optim and optax in each of their dialects, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optim_helpers as oh
from reference.optimizers import adam
from reference.optimizers._common import bias_correction

LRS = [1e-2 * m for m in oh.LR_MULTIPLIERS]


@pytest.mark.checks("adamw_lambda0_equals_adam")
@given(seed=st.integers(0, 2**16), amsgrad=st.booleans())
def test_adamw_with_lambda_0_equals_adam(seed, amsgrad):
    params, grads = oh.tree(np.random.default_rng(seed)), oh.gradients(seed, 5)
    a = oh.oracle_run("adam", params, grads, [1e-2] * 5, amsgrad=amsgrad)
    w = oh.oracle_run("adamw", params, grads, [1e-2] * 5, amsgrad=amsgrad, weight_decay=0.0)
    assert oh.worst(w, a) == 0.0


@pytest.mark.checks("beta1_0_beta2_to_0_is_sign_like")
@given(seed=st.integers(0, 2**16))
def test_beta1_0_and_beta2_to_0_is_sign_like(seed):
    """m = g, v = g^2, no bias correction left: the step is lr g/(|g| + eps) = lr sign(g)."""
    rng = np.random.default_rng(seed)
    params, grads = oh.tree(rng), oh.tree(rng)
    new, _ = adam.step(params, grads, adam.init(params), lr=0.1, beta1=0.0, beta2=0.0, eps=0.0)
    for p, w in params.items():
        # w - new carries the rounding of w - lr sign(g): one ulp of |w|
        np.testing.assert_allclose(w - new[p], 0.1 * np.sign(grads[p]), rtol=0,
                                   atol=2.0**-52 * (np.max(np.abs(w)) + 0.1))


@pytest.mark.checks("eps_hat_equals_corrected_with_rescaled_eps")
@given(seed=st.integers(0, 2**16), t=st.integers(0, 30), eps=st.floats(1e-10, 1e-2))
def test_eps_hat_is_the_corrected_form_with_a_step_dependent_eps(seed, t, eps):
    """Keras's eps_hat at step t equals torch's form with eps / sqrt(1 - beta2^t): no constant can."""
    rng = np.random.default_rng(seed)
    params, grads = oh.tree(rng), oh.tree(rng)
    state = {"step": np.asarray(float(t)), "exp_avg": oh.tree(rng, scale=0.1),
             "exp_avg_sq": {p: np.abs(v) for p, v in oh.tree(rng, scale=0.01).items()}}
    hat, _ = adam.step(params, grads, state, lr=0.1, eps=eps, adam_eps_mode="eps_hat")
    corrected, _ = adam.step(params, grads, state, lr=0.1,
                             eps=eps / bias_correction(0.999, t + 1) ** 0.5)
    assert oh.rel(hat, corrected) < 1e-13


@pytest.mark.checks("amsgrad_denominator_never_shrinks")
@given(seed=st.integers(0, 2**16), max_of=st.sampled_from(["raw", "corrected"]))
def test_amsgrad_maximum_never_shrinks(seed, max_of):
    """Reddi et al. Alg. 2: the maximum the denominator is built from, v_hat_t = max(v_hat_{t-1}, v_t),
    never shrinks, whether kept of the raw v (torch, Keras) or of the corrected one (optax)."""
    params, state = oh.tree(np.random.default_rng(seed)), None
    state = adam.init(params, amsgrad=True)
    for g in oh.gradients(seed, 6):
        before = state["max_exp_avg_sq"]
        params, state = adam.step(params, g, state, lr=1e-2, amsgrad=True, amsgrad_max_of=max_of)
        assert all(np.all(state["max_exp_avg_sq"][p] >= before[p]) for p in params)


TORCH_CASES = [
    ("adam", "Adam", {"weight_decay": 1e-2}),
    ("adam", "Adam", {"amsgrad": True, "eps": 1e-3}),
    ("adamw", "AdamW", {"weight_decay": 0.1}),
    ("adamw", "AdamW", {"weight_decay": 0.1, "amsgrad": True}),
]


@pytest.mark.parametrize("op, cls, hp", TORCH_CASES, ids=["adam-l2", "amsgrad", "adamw", "adamw-amsgrad"])
def test_float64_trajectory_matches_torch(op, cls, hp):
    torch = pytest.importorskip("torch")
    params, grads = oh.tree(np.random.default_rng(1)), oh.gradients(2)
    expected = oh.oracle_run(op, params, grads, LRS, **hp)
    got = oh.torch_run(lambda g: getattr(torch.optim, cls)(g, lr=LRS[0], foreach=False, **hp),
                       params, grads, LRS)
    assert oh.worst(got, expected) < 1e-13


def test_masked_adamw_matches_torch_parameter_groups():
    torch = pytest.importorskip("torch")
    params, grads = oh.tree(np.random.default_rng(3)), oh.gradients(4)
    expected = oh.oracle_run("adamw", params, grads, LRS, weight_decay=0.1, weight_decay_mask="no_bias_no_norm")

    def groups(tensors):
        decayed = ["conv/weight", "fc/weight"]
        return [{"params": [tensors[p] for p in decayed]},
                {"params": [t for p, t in tensors.items() if p not in decayed], "weight_decay": 0.0}]

    got = oh.torch_run(lambda g: torch.optim.AdamW(g, lr=LRS[0], weight_decay=0.1, foreach=False),
                       params, grads, LRS, groups)
    assert oh.worst(got, expected) < 1e-13


def test_float64_trajectories_match_optax():
    pytest.importorskip("optax")
    import optax

    params, grads = oh.tree(np.random.default_rng(5)), oh.gradients(6)
    mask = {p: p in ("conv/weight", "fc/weight") for p in params}
    cases = [
        ({"op": "adam"}, lambda lr: optax.adam(lr)),
        ({"op": "adam", "amsgrad": True, "amsgrad_max_of": "corrected"}, lambda lr: optax.amsgrad(lr)),
        ({"op": "adamw", "weight_decay": 0.1, "weight_decay_mask": "no_bias_no_norm"},
         lambda lr: optax.adamw(lr, weight_decay=0.1, mask=mask)),
        ({"op": "adam", "weight_decay": 1e-2},
         lambda lr: optax.chain(optax.add_decayed_weights(1e-2), optax.adam(lr))),
    ]
    for hp, make in cases:
        hp = dict(hp)
        expected = oh.oracle_run(hp.pop("op"), params, grads, LRS, **hp)
        assert oh.worst(oh.optax_run(make, params, grads, LRS), expected) < 1e-13, hp


def test_amsgrad_maxima_of_torch_and_optax_differ_as_the_knob_says():
    """The raw maximum (torch) and the corrected one (optax) part ways once v shrinks."""
    params = {"w": np.ones(4)}
    grads = [{"w": np.full(4, 10.0)}] + [{"w": np.full(4, 0.1)}] * 5
    raw = oh.oracle_run("adam", params, grads, [0.1] * 6, amsgrad=True)
    corrected = oh.oracle_run("adam", params, grads, [0.1] * 6, amsgrad=True, amsgrad_max_of="corrected")
    assert oh.rel(raw[-1], corrected[-1]) > 1e-3


# Bad hyper-parameters: [[error_cases]] in specs/optimizers/adam.toml (tests/test_error_cases.py).
# Kept here: it needs a specific (mismatched) state, which an error case cannot give.
def test_state_slots_must_match_the_parameters():
    params = {"w": np.ones(3), "b": np.ones(2)}
    state = adam.init(params)
    state["exp_avg"] = {"w": np.zeros(3)}
    with pytest.raises(ValueError, match=r"state\['exp_avg'\] must have the parameters' paths"):
        adam.step(params, {"w": np.ones(3), "b": np.ones(2)}, state)
