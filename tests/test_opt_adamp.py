"""AdamP and SGDP (reference/optimizers/adamp.py): the projection's invariants, the 1-D
reductions to AdamW / SGD, pytorch_optimizer trajectories (and the official package when
installed); bad input is the specs' [[error_cases]]."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optim_helpers as oh
import reference
from reference.optimizers import adam, adamp, sgd

ADAMP = reference.get("adamp")
SGDP = reference.get("sgdp")
SHAPES = {"conv/weight": (6, 3, 3, 3), "conv/bias": (6,), "fc/weight": (5, 8), "row/weight": (1, 12)}
#: tensors whose gradients are made scale-invariant (orthogonal to each output channel of w)
INVARIANT = ("conv/weight", "row/weight")

seeds = st.integers(0, 2**31 - 1)
shapes_2d = st.sampled_from([(1, 7), (3, 4), (5, 2), (4, 3, 3), (6, 2, 3, 3), (2, 40)])


def _tangent(w: np.ndarray, g: np.ndarray) -> np.ndarray:
    """g without its component along each output channel of w (a scale-invariant gradient)."""
    w2, g2 = w.reshape(w.shape[0], -1), g.reshape(w.shape[0], -1)
    g2 = g2 - np.sum(g2 * w2, axis=1, keepdims=True) / np.sum(w2 * w2, axis=1, keepdims=True) * w2
    return g2.reshape(w.shape)


def _invariant_grad(w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Gradient of the scale-invariant loss sum_rows <c_row, w_row / ||w_row||>."""
    w2, c2 = w.reshape(w.shape[0], -1), c.reshape(w.shape[0], -1)
    n = np.linalg.norm(w2, axis=1, keepdims=True)
    u = w2 / n
    return ((c2 - u * np.sum(u * c2, axis=1, keepdims=True)) / n).reshape(w.shape)


def _grads(params: dict[str, np.ndarray], k: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, k, 7])
    out = {}
    for p, w in params.items():
        g = 10.0 ** rng.uniform(-1, 1) * rng.standard_normal(w.shape)
        out[p] = _tangent(w, g) if p in INVARIANT else g
    return out


def _params(seed: int = 0) -> dict[str, np.ndarray]:
    return oh.tree(np.random.default_rng(seed), SHAPES)


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1)


# ------------------------------------------------------------------------------------------
# Invariants (hypothesis)
# ------------------------------------------------------------------------------------------


@settings(max_examples=30)
@given(seed=seeds, shape=shapes_2d, optimizer=st.sampled_from(["adamp", "sgdp"]),
       nesterov=st.booleans(), invariant=st.booleans(), steps=st.integers(1, 3),
       eps=st.sampled_from([0.0, 1e-8, 1e-3]))
def test_projected_step_is_orthogonal_to_weight_rows(seed, shape, optimizer, nesterov, invariant,
                                                     steps, eps):
    """When the projection fires, <w_row, dw_row> = 0 up to the eps in ||w_row|| + eps:
    <w, p - w_hat <w_hat, p>> = <w, p> (1 - ||w||^2 / (||w|| + eps)^2), at most 2 eps ||p||.
    Scale-invariant gradients fire at the default delta; otherwise delta = 1e3 forces it.  The
    unprojected step (delta = 0 from the same state) gives ||p||."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) + 0.5
    op = ADAMP if optimizer == "adamp" else SGDP
    hp = {"lr": 0.1, "nesterov": nesterov, "delta": 0.1 if invariant else 1e3, "eps": eps}
    if optimizer == "sgdp":
        hp["momentum"] = 0.9
    state = op.init({"w": w}, **hp)
    for _ in range(steps):
        g = rng.standard_normal(shape)
        g = _tangent(w, g) if invariant else g
        free, _ = op.step({"w": w}, {"w": g}, state, **{**hp, "delta": 0.0})
        new, state = op.step({"w": w}, {"w": g}, state, **hp)
        dw, free_dw, wr = _rows(new["w"] - w), _rows(free["w"] - w), _rows(w)
        inner = np.abs(np.sum(wr * dw, axis=1))
        norms = np.linalg.norm(wr, axis=1)
        allowed = (2.5 * eps * np.linalg.norm(free_dw, axis=1)
                   + 1e-13 * norms * (np.linalg.norm(dw, axis=1) + norms))
        assert np.all(inner <= allowed), (inner, allowed)
        assert adamp.project_radial(w, g, g, delta=hp["delta"], eps=eps)[1]   # it fired
        w = new["w"]


@settings(max_examples=30)
@given(seed=seeds, shape=shapes_2d, scale=st.floats(1e-3, 1e3))
def test_scale_invariant_weights_always_projected(seed, shape, scale):
    """The gradient of a scale-invariant loss is orthogonal to every row, so max |cos| ~ 1e-16 is
    below delta / sqrt(row length) in the channel view, whatever the weight's scale."""
    rng = np.random.default_rng(seed)
    w = scale * rng.standard_normal(shape)
    g = _invariant_grad(w, rng.standard_normal(shape))
    p = rng.standard_normal(shape)
    projected, fired = adamp.project_radial(w, g, p, delta=0.1, eps=1e-8)
    assert fired
    assert not np.allclose(projected, p)
    # and the step of AdamP uses wd_ratio for this tensor
    hp = {"lr": 0.1, "weight_decay": 0.5, "wd_ratio": 0.25}
    state = adamp.init({"w": w}, **hp)
    new, state = adamp.step({"w": w}, {"w": g}, state, **hp)
    m, v = state["exp_avg"]["w"], state["exp_avg_sq"]["w"]
    perturb, _ = adamp.project_radial(w, g, m / (np.sqrt(v) / np.sqrt(1 - 0.999) + 1e-8),
                                      delta=0.1, eps=1e-8)
    expect = w * (1 - 0.1 * 0.5 * 0.25) - 0.1 / (1 - 0.9) * perturb
    np.testing.assert_allclose(new["w"], expect, rtol=1e-13, atol=1e-13 * np.max(np.abs(w)))


def test_channel_then_layer_view():
    """A tensor one of whose channels is aligned with its gradient fails the channel view; the
    layer view (one row) can still fire, and then the whole tensor is projected as one vector."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((50, 4))
    g = _tangent(w, rng.standard_normal((50, 4)))
    g[0] = w[0] * 1e-3                       # channel 0: cos = 1 -> the channel view fails
    p = rng.standard_normal((50, 4))
    cos_layer = abs(np.sum(g * w)) / (np.linalg.norm(g) * np.linalg.norm(w))
    assert cos_layer < 0.1 / np.sqrt(w.size)
    projected, fired = adamp.project_radial(w, g, p, delta=0.1, eps=1e-8)
    assert fired
    w_hat = w / (np.linalg.norm(w) + 1e-8)
    np.testing.assert_allclose(projected, p - w_hat * np.sum(w_hat * p), rtol=1e-13, atol=1e-15)
    # with a large gradient along w the layer view fails too: nothing is projected
    g[0] = w[0] * 1e3
    projected, fired = adamp.project_radial(w, g, p, delta=0.1, eps=1e-8)
    assert not fired and projected is p


@settings(max_examples=25)
@given(seed=seeds, lr=st.floats(1e-4, 0.1), wd=st.floats(0.0, 0.5), beta1=st.floats(0.0, 0.99),
       beta2=st.floats(0.5, 0.9999), nolr=st.booleans())
def test_one_d_params_equal_adamw(seed, lr, wd, beta1, beta2, nolr):
    """1-D tensors are never projected: AdamP is Adam with decoupled decay (ratio 1)."""
    rng = np.random.default_rng(seed)
    params = {"b": rng.standard_normal(7), "g": rng.standard_normal(3) + 1.0}
    mode = "decoupled_nolr" if nolr else "decoupled_lr"
    hp = {"lr": lr, "weight_decay": wd, "beta1": beta1, "beta2": beta2, "weight_decay_mode": mode}
    a_p, a_s = dict(params), adamp.init(params, **hp)
    b_p, b_s = dict(params), adam.init(params, **hp)
    for _ in range(4):
        g = {p: rng.standard_normal(w.shape) for p, w in params.items()}
        a_p, a_s = adamp.step(a_p, g, a_s, **hp)
        b_p, b_s = adam.step(b_p, g, b_s, **hp)
        for p in params:
            np.testing.assert_allclose(a_p[p], b_p[p], rtol=1e-14, atol=1e-15)
            np.testing.assert_allclose(a_s["exp_avg_sq"][p], b_s["exp_avg_sq"][p], rtol=1e-14)


@settings(max_examples=25)
@given(seed=seeds, lr=st.floats(1e-4, 0.5), wd=st.floats(0.0, 0.5), momentum=st.floats(0.0, 0.95),
       dampening=st.floats(0.0, 0.9), nesterov=st.booleans())
def test_one_d_params_equal_sgd_decoupled_over_one_minus_mu(seed, lr, wd, momentum, dampening,
                                                           nesterov):
    """1-D tensors: SGDP is SGD with a zero-started buffer and decoupled decay lambda/(1 - mu)."""
    if momentum == 0.0 or nesterov:
        dampening = 0.0       # torch SGD ignores dampening without momentum; nesterov needs 0
    if nesterov and momentum == 0.0:
        nesterov = False
    rng = np.random.default_rng(seed)
    params = {"b": rng.standard_normal(5), "s": rng.standard_normal(2)}
    hp = {"lr": lr, "momentum": momentum, "dampening": dampening, "nesterov": nesterov}
    sgd_hp = {**hp, "weight_decay": wd / (1 - momentum), "weight_decay_mode": "decoupled_lr",
              "first_step": "zeros"}
    a_p, a_s = dict(params), adamp.init_sgdp(params, **hp, weight_decay=wd)
    b_p, b_s = dict(params), sgd.init(params, **sgd_hp)
    for _ in range(4):
        g = {p: rng.standard_normal(w.shape) for p, w in params.items()}
        a_p, a_s = adamp.step_sgdp(a_p, g, a_s, **hp, weight_decay=wd)
        b_p, b_s = sgd.step(b_p, g, b_s, **sgd_hp)
        for p in params:
            np.testing.assert_allclose(a_p[p], b_p[p], rtol=1e-13, atol=1e-14)


@settings(max_examples=20)
@given(seed=seeds, shape=shapes_2d, nesterov=st.booleans(), delta=st.sampled_from([1e-6, 1e3]))
def test_eps_hat_equals_corrected_without_eps(seed, shape, nesterov, delta):
    """At eps = 0 the two placements of eps are the same formula (up to rounding)."""
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal(shape), "b": rng.standard_normal(shape[0])}
    hp = {"lr": 0.01, "eps": 0.0, "nesterov": nesterov, "delta": delta, "weight_decay": 0.1}
    out = {}
    for mode in ("corrected", "eps_hat"):
        p, s = dict(params), adamp.init(params, **hp)
        for k in range(3):
            p, s = adamp.step(p, _grads(p, k, seed), s, **hp, adam_eps_mode=mode)
        out[mode] = p
    for name in params:
        np.testing.assert_allclose(out["eps_hat"][name], out["corrected"][name], rtol=1e-12)


@settings(max_examples=20)
@given(seed=seeds, nesterov=st.booleans(), invariant=st.booleans())
def test_buffer_projection_only_changes_projected_non_nesterov(seed, nesterov, invariant):
    """"projected" stores the projected step as the buffer (the official code's in-place edit);
    "raw" keeps mu b + (1 - tau) g.  They agree unless the projection fired without Nesterov."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 6))
    hp = {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": nesterov,
          "delta": 0.1 if invariant else 0.0}          # delta = 0: never projects
    states = {m: adamp.init_sgdp({"w": w}, **hp) for m in ("projected", "raw")}
    params = {m: {"w": w} for m in states}
    for k in range(3):    # the buffers differ after step 2, the parameters after step 3
        base = np.random.default_rng([seed, k, 7]).standard_normal(w.shape)
        for m in states:
            cur = params[m]["w"]
            g = _tangent(cur, base) if invariant else base
            before = states[m]["momentum_buffer"]["w"]
            params[m], states[m] = adamp.step_sgdp(params[m], {"w": g}, states[m], **hp,
                                                   buffer_projection=m)
            raw = 0.9 * before + 0.9 * g
            if m == "raw" or nesterov or not invariant:
                np.testing.assert_allclose(states[m]["momentum_buffer"]["w"], raw, rtol=1e-14)
            else:   # the buffer is the step actually taken
                np.testing.assert_allclose(states[m]["momentum_buffer"]["w"],
                                           (cur - params[m]["w"]) / 0.1, rtol=1e-10, atol=1e-12)
    if nesterov or not invariant:
        np.testing.assert_allclose(params["raw"]["w"], params["projected"]["w"], rtol=1e-14)
    else:
        assert not np.allclose(params["raw"]["w"], params["projected"]["w"], rtol=1e-10)


# ------------------------------------------------------------------------------------------
# Framework trajectories (float64)
# ------------------------------------------------------------------------------------------

def _torch_trajectory(make, op, hp, seed=0):
    """Run the framework optimizer and the oracle side by side (the lr changed mid-run); max
    relative error over all parameters and steps."""
    pytest.importorskip("torch")
    return oh.torch_vs_oracle(make, op, hp, _params(seed), lambda k, params: _grads(params, k, seed),
                              oh.LR_MULTIPLIERS)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("fixed_decay", [False, True])
def test_adamp_matches_pytorch_optimizer(nesterov, fixed_decay):
    po = pytest.importorskip("pytorch_optimizer")
    extra = {"weight_decay_mode": "decoupled_nolr"} if fixed_decay else {}
    hp = ADAMP.spec.resolve({"lr": 0.01, "weight_decay": 0.1, "eps": 1e-3, "nesterov": nesterov,
                             **extra}, dialect="pytorch_optimizer")
    assert hp["adam_eps_mode"] == "eps_hat"

    def make(ps):
        return po.AdamP(ps, lr=hp["lr"], weight_decay=0.1, eps=1e-3, nesterov=nesterov,
                        fixed_decay=fixed_decay)

    assert _torch_trajectory(make, ADAMP, hp) < 1e-12
    # eps large enough that its placement matters: the corrected form is a different trajectory
    assert _torch_trajectory(make, ADAMP, {**hp, "adam_eps_mode": "corrected"}) > 1e-6


@pytest.mark.parametrize(("nesterov", "dampening"), [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_sgdp_matches_pytorch_optimizer(nesterov, dampening):
    po = pytest.importorskip("pytorch_optimizer")
    hp = SGDP.spec.resolve({"lr": 0.05, "momentum": 0.9, "dampening": dampening,
                            "nesterov": nesterov, "weight_decay": 0.01},
                           dialect="pytorch_optimizer")

    def make(ps):
        return po.SGDP(ps, lr=0.05, momentum=0.9, dampening=dampening, nesterov=nesterov,
                       weight_decay=0.01)

    assert _torch_trajectory(make, SGDP, hp) < 1e-12
    projected = _torch_trajectory(make, SGDP, {**hp, "buffer_projection": "projected"})
    assert (projected < 1e-12) if nesterov else (projected > 1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_official_package(nesterov):
    """clovaai's own package (PyPI ``adamp``), when installed: the default (official) dialect."""
    official = pytest.importorskip("adamp")
    hp = ADAMP.spec.resolve({"lr": 0.01, "weight_decay": 0.1, "eps": 1e-3, "nesterov": nesterov},
                            dialect="official")
    assert _torch_trajectory(lambda ps: official.AdamP(ps, lr=0.01, weight_decay=0.1, eps=1e-3,
                                                        nesterov=nesterov), ADAMP, hp) < 1e-12
    hp = SGDP.spec.resolve({"lr": 0.05, "momentum": 0.9, "nesterov": nesterov,
                            "weight_decay": 0.01}, dialect="official")
    assert _torch_trajectory(lambda ps: official.SGDP(ps, lr=0.05, momentum=0.9, nesterov=nesterov,
                                                       weight_decay=0.01), SGDP, hp) < 1e-12


# ------------------------------------------------------------------------------------------
# The harness form, lower precision (bad input: the specs' [[error_cases]])
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_flat_apply_and_float32(name):
    op = reference.get(name)
    params = _params(1)
    grads = _grads(params, 0, 1)
    flat = oh.flat(params, grads)
    hp = {"lr": 0.01, "weight_decay": 0.1}
    out, state = op.apply(flat, None, **hp)
    out2, state2 = op.apply(flat, state, **hp)
    assert set(out) == {f"params/{p}" for p in params}
    assert state2["step"] == 2.0 and set(state2) == set(state)
    # the raw step keeps float32
    p32, g32 = oh.as_float32(params), oh.as_float32(grads)
    init, step = ((adamp.init, adamp.step) if name == "adamp"
                  else (adamp.init_sgdp, adamp.step_sgdp))
    full = op.spec.resolve(hp)
    new, _ = step.__wrapped__(p32, g32, init.__wrapped__(p32, **full), **full)
    for p in params:
        assert new[p].dtype == np.float32
        np.testing.assert_allclose(new[p], out[f"params/{p}"], rtol=1e-5, atol=1e-6)
