"""RepBN / Progressive RepBN: forward vs mpmath on adversarial data, the lambda schedule and the
blend, the merge into the next linear layer (the official merge_bn), the official RepBN and
LinearNorm modules restated in float64 torch over train/eval calls, the official float32 lambda,
bad input, and two harness mutants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from conformance.cases import ADVERSARIAL, adversarial
from helpers import (
    MIN_FLAGGED,
    flagged_cases,
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
from reference.normalizers.rep_bn import merge_into_linear

OP = reference.get("rep_bn")
BN = reference.get("batch_norm")
LN = reference.get("layer_norm")
RNG = np.random.default_rng(20260613)


def _inputs(rng, shape, ln=True):
    c = shape[-1]
    out = {"x": rng.standard_normal(shape) * 1.5 + 0.3, "weight": 1 + 0.3 * rng.standard_normal(c),
           "bias": rng.standard_normal(c), "alpha": np.array([0.5 + rng.random()])}
    if ln:
        out |= {"ln_weight": 1 + 0.3 * rng.standard_normal(c), "ln_bias": rng.standard_normal(c)}
    return out


def _bn_state(rng, c, count=2.0):
    return {"running_mean": rng.standard_normal(c), "running_var": rng.uniform(0.5, 2.0, c),
            "num_batches_tracked": np.float64(count)}


def mp_rep_bn(inputs, lam, eps, ln_eps, state=None):
    """lambda * LN(x) + (1 - lambda) * (BN(x) + alpha x) at 50 digits, channels last, BN over every
    other axis (biased variance) or, with ``state``, the running statistics."""
    x = inputs["x"]
    R = tuple(range(x.ndim - 1))
    X = mp_array(x)
    if state is None:
        x_bn = (X - mp_mean(X, R)) / mp_sqrt(mp_var(X, R) + mp_array(np.float64(eps)))
    else:
        x_bn = (X - mp_array(state["running_mean"])) / mp_sqrt(mp_array(state["running_var"])
                                                               + mp_array(np.float64(eps)))
    rep = x_bn * mp_array(inputs["weight"]) + mp_array(inputs["bias"]) + mp_array(inputs["alpha"])[0] * X
    if lam == 0:
        return rep
    last = (x.ndim - 1,)
    x_ln = (X - mp_mean(X, last)) / mp_sqrt(mp_var(X, last) + mp_array(np.float64(ln_eps)))
    ln = x_ln * mp_array(inputs["ln_weight"]) + mp_array(inputs["ln_bias"])
    L = mp_array(np.float64(lam))
    return L * ln + (1 - L) * rep


# --- forward accuracy -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["blend", "eval"])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_forward_matches_mpmath_on_adversarial_data(family, mode):
    """The blend (lambda = 0.6: r0 = 0.6 at the first decay call) in training and RepBN with running
    statistics in eval, within 1e-10 relative (normwise) of 50 digits."""
    inputs = _inputs(RNG, (3, 4, 5))
    inputs["x"] = adversarial(family, (3, 4, 5))
    eps = ln_eps = 1e-310 if family == "tiny_1e-150" else 1e-5  # below the tiny family's variance
    hp = {"total_steps": 5, "r0": 0.6, "eps": max(eps, 1e-300), "ln_eps": max(ln_eps, 1e-300)}
    if mode == "blend":
        y = OP.apply(inputs, None, **hp)[0]["y"]
        expect = mp_rep_bn(inputs, 0.6, hp["eps"], hp["ln_eps"])
    else:
        state = {**_bn_state(RNG, 5), "warm": np.float64(0), "decay_iter": np.float64(3)}
        state["running_mean"] = state["running_mean"] * np.max(np.abs(inputs["x"]))
        y = OP.apply(inputs, state, **hp, training=False)[0]["y"]
        expect = mp_rep_bn(inputs, 0.0, hp["eps"], hp["ln_eps"], state)
    err = relative_error(y, expect)
    assert err <= 1e-10, f"{family}: relative error {err:.3g}"


# --- properties -------------------------------------------------------------------------------

token_shapes = st.tuples(st.integers(1, 3), st.integers(2, 5), st.integers(1, 4))


@given(shape=token_shapes, seed=st.integers(0, 2**32 - 1), training=st.booleans(),
       momentum=st.sampled_from([0.1, 0.5, None]))
def test_rep_bn_is_batch_norm_plus_alpha_x(shape, seed, training, momentum):
    """progressive=False: y = batch_norm(x, channels last) + alpha x, the state is batch_norm's, and
    dx = batch_norm's dx + alpha dy, dgamma, dbeta batch_norm's."""
    rng = np.random.default_rng(seed)
    inputs = _inputs(rng, shape, ln=False)
    state, dy = _bn_state(rng, shape[-1]), rng.standard_normal(shape)
    hp = {"progressive": False, "training": training, "momentum": momentum}
    out, new_state = OP.apply(inputs, state, **hp)
    bn_in = {k: inputs[k] for k in ("x", "weight", "bias")}
    bn_hp = {"axis": -1, "training": training, "momentum": momentum}
    ref, ref_state = BN.apply(bn_in, state, **bn_hp)
    alpha = inputs["alpha"][0]
    np.testing.assert_array_equal(out["y"], ref["y"] + alpha * inputs["x"])
    for key in ref_state:
        np.testing.assert_array_equal(new_state[key], ref_state[key])
    g, ref_g = OP.vjp(inputs, state, {"y": dy}, **hp), BN.vjp(bn_in, state, {"y": dy}, **bn_hp)
    np.testing.assert_array_equal(g["x"], ref_g["x"] + alpha * dy)
    np.testing.assert_array_equal(g["weight"], ref_g["weight"])
    np.testing.assert_array_equal(g["bias"], ref_g["bias"])


def _official_merge(W, c, gamma, beta, alpha, rm, rv, eps):
    """swin_transformer.py merge_bn, restated: a = gamma / sqrt(var + eps) + alpha, b = beta - gamma mu
    / sqrt(var + eps), W' = (diag(a) @ W^T)^T, c' = (b @ W^T) + c."""
    a = gamma / np.sqrt(rv + eps) + alpha
    b = beta - gamma * rm / np.sqrt(rv + eps)
    return (np.diag(a) @ W.T).T, b[None, :] @ W.T + c


@given(shape=token_shapes, seed=st.integers(0, 2**32 - 1), out=st.integers(1, 5),
       affine=st.booleans(), eps=st.sampled_from([1e-5, 1e-3]))
def test_merges_into_next_linear(shape, seed, out, affine, eps):
    """In inference Linear(W, c)(RepBN(x)) = x W'^T + c' (merge_into_linear), and W', c' are the
    official merge_bn's; a model evaluated before lambda reaches 0 merges the same way."""
    rng = np.random.default_rng(seed)
    inputs = _inputs(rng, shape)
    if not affine:
        del inputs["weight"], inputs["bias"]
    state = {**_bn_state(rng, shape[-1]), "warm": np.float64(0), "decay_iter": np.float64(7)}
    W, c = rng.standard_normal((out, shape[-1])), rng.standard_normal(out)
    y = OP.apply(inputs, state, training=False, eps=eps, total_steps=9)[0]["y"]
    Wm, cm = merge_into_linear(W, c, inputs.get("weight"), inputs.get("bias"), inputs["alpha"],
                               state["running_mean"], state["running_var"], eps=eps)
    # Both sides sum C products of O(1) terms: a few ulps of sum |W| |a x + b|.
    scale = np.abs(inputs["x"]).max() * np.abs(W).sum(axis=1).max() * 10
    np.testing.assert_allclose(y @ W.T + c, inputs["x"] @ Wm.T + cm, rtol=0, atol=1e-14 * scale)
    gamma = inputs.get("weight", np.ones(shape[-1]))
    beta = inputs.get("bias", np.zeros(shape[-1]))
    Wo, co = _official_merge(W, c, gamma, beta, inputs["alpha"][0], state["running_mean"],
                             state["running_var"], eps)
    np.testing.assert_allclose(Wm, Wo, rtol=1e-15)
    np.testing.assert_allclose(cm, co[0], rtol=0, atol=1e-14 * scale)


def _lambdas(warmup, total, r0, calls):
    """LinearNorm's blend weight per training call: None during the warm-up (LN alone)."""
    out, warm, it = [], warmup, total
    for _ in range(calls):
        if warm > 0:
            out.append(None)
            warm -= 1
            continue
        out.append(r0 * it / total)
        it = max(it - 1, 0)
    return out


@given(seed=st.integers(0, 2**32 - 1), warmup=st.integers(0, 2), total=st.integers(1, 3),
       r0=st.sampled_from([1.0, 0.5]))
def test_lambda_schedule(seed, warmup, total, r0):
    """Warm-up calls output LN(x) and leave BN's state; then lambda = r0 (S - t)/S for t = 0..S and 0
    after, the output the blend of LN and RepBN (RepBN run from the same BN state), the counters
    warm and decay_iter as LinearNorm's buffers."""
    rng = np.random.default_rng(seed)
    shape = (2, 3, 4)
    hp = {"warmup": warmup, "total_steps": total, "r0": r0}
    state = None
    for k, lam in enumerate(_lambdas(warmup, total, r0, warmup + total + 2)):
        inputs = _inputs(rng, shape)
        before = state or OP.init_state(inputs, **hp)
        out, state = OP.apply(inputs, before, **hp)
        ln = LN.apply({"x": inputs["x"], "weight": inputs["ln_weight"], "bias": inputs["ln_bias"]}, None)[0]["y"]
        bn_part = {k2: before[k2] for k2 in ("running_mean", "running_var", "num_batches_tracked")}
        rep_in = {k2: inputs[k2] for k2 in ("x", "weight", "bias", "alpha")}
        rep, rep_state = OP.apply(rep_in, bn_part, progressive=False)
        if lam is None:
            np.testing.assert_array_equal(out["y"], ln)
            for key in bn_part:
                np.testing.assert_array_equal(state[key], before[key])
        else:
            # the same two branches, blended in the same arithmetic: bit for bit
            np.testing.assert_array_equal(out["y"], lam * ln + (1 - lam) * rep["y"])
            for key in rep_state:
                np.testing.assert_array_equal(state[key], rep_state[key])
        assert float(state["warm"]) == max(warmup - k - 1, 0)
        decay_calls = max(k + 1 - warmup, 0)
        assert float(state["decay_iter"]) == max(total - decay_calls, 0)


@given(seed=st.integers(0, 2**32 - 1), decay_iter=st.integers(0, 4), r0=st.floats(0.0, 1.0))
def test_blend_is_linear_in_the_branches(seed, decay_iter, r0):
    """Every gradient is lambda times LayerNorm's plus (1 - lambda) times RepBN's."""
    rng = np.random.default_rng(seed)
    shape = (3, 2, 4)
    inputs, dy = _inputs(rng, shape), rng.standard_normal(shape)
    state = {**_bn_state(rng, 4), "warm": np.float64(0), "decay_iter": np.float64(decay_iter)}
    hp = {"total_steps": 4, "r0": r0}
    lam = r0 * decay_iter / 4
    g = OP.vjp(inputs, state, {"y": dy}, **hp)
    rep_in = {k: inputs[k] for k in ("x", "weight", "bias", "alpha")}
    bn_state = {k: state[k] for k in ("running_mean", "running_var", "num_batches_tracked")}
    g_rep = OP.vjp(rep_in, bn_state, {"y": dy}, progressive=False)
    g_ln = LN.vjp({"x": inputs["x"], "weight": inputs["ln_weight"], "bias": inputs["ln_bias"]}, None, {"y": dy})
    np.testing.assert_allclose(g["x"], lam * g_ln["x"] + (1 - lam) * g_rep["x"], rtol=1e-14, atol=1e-14)
    for key in ("weight", "bias", "alpha"):
        np.testing.assert_array_equal(g[key], (1 - lam) * g_rep[key])
    for key in ("weight", "bias"):
        np.testing.assert_array_equal(g[f"ln_{key}"], lam * g_ln[key])


@given(seed=st.integers(0, 2**32 - 1), warm=st.integers(0, 2), decay_iter=st.integers(0, 5))
def test_eval_is_rep_bn_at_any_lambda(seed, warm, decay_iter):
    """Inference is RepBN with running statistics whatever the counters say; they and BN's state stay
    unchanged, and the LayerNorm's gain and bias get zero gradients."""
    rng = np.random.default_rng(seed)
    shape = (2, 3, 5)
    inputs, dy = _inputs(rng, shape), rng.standard_normal(shape)
    state = {**_bn_state(rng, 5), "warm": np.float64(warm), "decay_iter": np.float64(decay_iter)}
    out, new_state = OP.apply(inputs, state, training=False, total_steps=5)
    rep_in = {k: inputs[k] for k in ("x", "weight", "bias", "alpha")}
    bn_state = {k: state[k] for k in ("running_mean", "running_var", "num_batches_tracked")}
    rep = OP.apply(rep_in, bn_state, progressive=False, training=False)[0]["y"]
    np.testing.assert_array_equal(out["y"], rep)
    for key in state:
        np.testing.assert_array_equal(new_state[key], state[key])
    g = OP.vjp(inputs, state, {"y": dy}, training=False, total_steps=5)
    assert np.all(g["ln_weight"] == 0) and np.all(g["ln_bias"] == 0)
    a = inputs["weight"] / np.sqrt(state["running_var"] + 1e-5) + inputs["alpha"][0]
    np.testing.assert_allclose(g["x"], dy * a, rtol=1e-15)


@given(seed=st.integers(0, 2**32 - 1), training=st.booleans(), decay_iter=st.integers(0, 3))
def test_grad_alpha_is_sum_dy_x(seed, training, decay_iter):
    """dalpha = (1 - lambda) sum(dy x) in training, sum(dy x) in inference; 0 during the warm-up."""
    rng = np.random.default_rng(seed)
    inputs, dy = _inputs(rng, (3, 3, 2)), rng.standard_normal((3, 3, 2))
    state = {**_bn_state(rng, 2), "warm": np.float64(0), "decay_iter": np.float64(decay_iter)}
    g = OP.vjp(inputs, state, {"y": dy}, training=training, total_steps=3)["alpha"]
    lam = decay_iter / 3 if training else 0.0
    np.testing.assert_allclose(g, [(1 - lam) * np.sum(dy * inputs["x"])], rtol=1e-14)
    warm = OP.vjp(inputs, {**state, "warm": np.float64(1)}, {"y": dy}, total_steps=3)
    assert warm["alpha"][0] == 0 and np.all(warm["weight"] == 0) and np.all(warm["bias"] == 0)


def test_dialect_values():
    assert OP.dialect("slab_deit")["total_steps"] == 60000 and OP.dialect("slab_deit")["ln_eps"] == 1e-6
    assert OP.dialect("slab_cswin")["total_steps"] == 120000
    assert OP.dialect("prepbn_deit_pvt")["total_steps"] == 300000
    assert OP.dialect("repbn")["progressive"] is False


# --- the official modules in torch (float64) -----------------------------------------------------


def _official_modules(torch, c, hp, inputs):
    """prepbn.py's RepBN and LinearNorm restated from the official semantics: BatchNorm1d on the
    (B, C, N) transpose plus alpha x; LinearNorm's warm / iter / total_step buffers with lambda from
    iter before its decrement.  lambda is formed in float64 here (the official expression gives
    float32: test_official_lambda_is_float32)."""
    nn = torch.nn

    class RepBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(t64(inputs["alpha"]))
            self.bn = nn.BatchNorm1d(c, eps=hp["eps"], momentum=hp["momentum"], dtype=torch.float64)

        def forward(self, x):
            return (self.bn(x.transpose(1, 2)) + self.alpha * x.transpose(1, 2)).transpose(1, 2)

    class LinearNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.warm, self.iter, self.total = hp["warmup"], hp["total_steps"], hp["total_steps"]
            self.norm1 = nn.LayerNorm(c, eps=hp["ln_eps"], dtype=torch.float64)
            self.norm2 = RepBN()

        def forward(self, x):
            if not self.training:
                return self.norm2(x)
            if self.warm > 0:
                self.warm -= 1
                return self.norm1(x)
            lam = hp["r0"] * self.iter / self.total
            if self.iter > 0:
                self.iter -= 1
            return lam * self.norm1(x) + (1 - lam) * self.norm2(x)

    module = LinearNorm()
    with torch.no_grad():
        module.norm2.bn.weight.copy_(t64(inputs["weight"]))
        module.norm2.bn.bias.copy_(t64(inputs["bias"]))
        module.norm1.weight.copy_(t64(inputs["ln_weight"]))
        module.norm1.bias.copy_(t64(inputs["ln_bias"]))
    return module


@pytest.mark.parametrize("dialect", ["slab_deit", "slab_swin"])
@pytest.mark.parametrize(("warmup", "total", "r0"), [(0, 3, 1.0), (1, 2, 0.5)])
def test_matches_the_official_modules_in_torch(dialect, warmup, total, r0):
    """Seven calls (warm-up, the decay, lambda = 0, an eval call in the middle) of the official
    LinearNorm(LayerNorm, RepBN) restated in float64 torch: outputs, autograd gradients of x, alpha,
    BN's and LN's affine, BN's running statistics and the counters.  Measured worst relative errors
    (3 draws of each parametrization): y 3.4e-16; the gradients of x, gamma, beta and LN's gain and
    bias 9.5e-16; alpha's 9.3e-17 of sum |dy x| (the sum cancels: 2.3e-14 of its value); running
    statistics 3.6e-16."""
    torch = torch_or_skip()
    hp = {**OP.dialect(dialect), "warmup": warmup, "total_steps": total, "r0": r0}
    shape = (3, 5, 4)
    params = _inputs(RNG, shape)
    module = _official_modules(torch, 4, hp, params)
    state = None
    for call in range(7):
        training = call != 3
        module.train(training)
        x, dy = RNG.standard_normal(shape) * (call + 1) + call, RNG.standard_normal(shape)
        inputs = {**params, "x": x}
        step_hp = {**hp, "training": training}
        if state is None:
            state = OP.init_state(inputs, **step_hp)
        grads = OP.vjp(inputs, state, {"y": dy}, **step_hp)
        out, state = OP.apply(inputs, state, **step_hp)
        tx = t64(x, True)
        ty = module(tx)
        np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-13, atol=1e-14)
        leaves = {"x": tx, "alpha": module.norm2.alpha, "weight": module.norm2.bn.weight,
                  "bias": module.norm2.bn.bias, "ln_weight": module.norm1.weight, "ln_bias": module.norm1.bias}
        found = torch.autograd.grad(ty, list(leaves.values()), t64(dy), allow_unused=True)
        for (key, leaf), got in zip(leaves.items(), found, strict=True):
            want = np.zeros(tuple(leaf.shape)) if got is None else got.numpy()
            np.testing.assert_allclose(grads[key], want, rtol=1e-12, atol=1e-13, err_msg=f"call {call}: {key}")
        bn = module.norm2.bn
        np.testing.assert_allclose(state["running_mean"], bn.running_mean.numpy(), rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(state["running_var"], bn.running_var.numpy(), rtol=1e-14)
        assert int(state["num_batches_tracked"]) == int(bn.num_batches_tracked)
        assert (float(state["warm"]), float(state["decay_iter"])) == (module.warm, module.iter)


def test_official_lambda_is_float32():
    """Finding: LinearNorm's ``r0 * self.iter / self.total_step`` divides int64 buffers, which torch
    does in its default float32; 1/3 becomes 0.3333333433, 3e-8 from the float64 lambda the oracle
    uses (a float64 model blends with that error)."""
    torch = torch_or_skip()
    it, total = torch.tensor(1), torch.tensor(3)
    lam = 1.0 * it / total
    assert lam.dtype == torch.float32
    assert abs(float(lam) - 1 / 3) / (1 / 3) == pytest.approx(2.98e-8, rel=1e-2)


# --- the harness flags plausible mistakes -------------------------------------------------------


class _Rep(Mutant):
    op = "rep_bn"
    dtypes = ("float64",)  # the mistakes do not depend on the rounding; half the harness time


class PRepBNLambdaAfterDecrement(_Rep):
    """lambda computed from the counter after its decrement (``iter -= 1`` moved above the
    ``lamda = r0 * iter / total_step`` line): every blend one step late, lambda 0 one call early."""

    def forward(self, a, hp):
        if hp["progressive"] and hp["training"] and float(a["warm"]) <= 0 and float(a["decay_iter"]) > 0:
            early = {**a, "decay_iter": a["decay_iter"] - 1}
            out, state = self.oracle(early, hp)
            return out, {**state, "decay_iter": a["decay_iter"] - 1}
        return self.oracle(a, hp)

    def backward(self, ct, a, hp):
        if hp["progressive"] and hp["training"] and float(a["warm"]) <= 0 and float(a["decay_iter"]) > 0:
            return self.oracle_vjp(ct, {**a, "decay_iter": a["decay_iter"] - 1}, hp)
        return self.oracle_vjp(ct, a, hp)


class RepBNAlphaGradUnweighted(_Rep):
    """A hand-written backward gives alpha the gradient sum(dy x) of RepBN alone, forgetting the
    blend's (1 - lambda) factor on the RepBN branch."""

    def backward(self, ct, a, hp):
        grads = self.oracle_vjp(ct, a, hp)
        grads["alpha"] = np.reshape(np.sum(ct["y"] * a["x"]), (1,))  # the mistake: no (1 - lambda)
        return grads


@pytest.mark.parametrize("cls", [PRepBNLambdaAfterDecrement, RepBNAlphaGradUnweighted], ids=lambda c: c.__name__)
def test_mutants_are_flagged(cls):
    flagged, results = flagged_cases(cls())
    assert flagged >= MIN_FLAGGED, f"{cls.__name__} flagged by {flagged} cases:\n{verdict_table(results)}"


def test_the_unmutated_control_is_not_flagged():
    """The mutants' plumbing without a mistake: no FAIL, ERROR or CONVENTION."""
    _, results = run_mutant(Control(_Rep.op, _Rep.dialect, _Rep.dtypes))
    flagged = [r for r in results if r.verdict in ("FAIL", "ERROR", "CONVENTION")]
    assert not flagged, verdict_table(flagged)
