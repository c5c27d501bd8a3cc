"""Gradient clipping (reference/optimizers/clipping.py; specs global_norm_clip, per_tensor_clip, agc).

(1) the invariants of Pascanu et al. / Brock et al. as hypothesis properties, (2) float64
trajectories against torch.nn.utils.clip_grad_norm_, optax.clip_by_global_norm /
clip_by_block_rms / adaptive_grad_clip and pytorch_optimizer.agc, (3) bad input to the helpers
(the ops': their specs' [[error_cases]]).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optim_helpers as oh
import reference
from reference.optimizers import clipping as C

RTOL = 1e-12
SHAPES_OUT_FIRST = {"conv/weight": (8, 3, 3, 3), "conv/bias": (8,), "attn/weight": (4, 6, 5),
                    "fc/weight": (10, 16), "fc/bias": (10,)}
# JAX layout: (in, out), HWIO, and a (1, n) row that optax treats as a vector.
SHAPES_OUT_LAST = {"conv/weight": (3, 3, 4, 8), "attn/weight": (6, 4, 5), "fc/weight": (16, 10),
                   "fc/bias": (10,), "row": (1, 7)}


def _close(a, b, rtol=RTOL):
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-300, err_msg=k)


def _gnorm(tree):
    return float(np.sqrt(sum(np.sum(v * v) for v in tree.values())))


# ------------------------------------------------------------------------------------------
# (1) properties
# ------------------------------------------------------------------------------------------

seeds = st.integers(0, 2**32 - 1)
log_scales = st.floats(-6.0, 6.0)


@pytest.mark.checks("global_clip_keeps_direction", "global_clip_norm_at_most_c",
                    "global_clip_below_threshold_bit_identical", "global_clip_idempotent")
@given(seed=seeds, log_scale=log_scales, c=st.floats(1e-3, 1e3), eps_add=st.sampled_from([0.0, 1e-6]))
def test_global_clip_keeps_direction_and_bounds_norm(seed, log_scale, c, eps_add):
    rng = np.random.default_rng(seed)
    g = oh.tree(rng, SHAPES_OUT_FIRST, 10.0**log_scale)
    out = C.clip_by_global_norm(g, c, eps_add=eps_add)
    n = _gnorm(g)
    if n + eps_add <= c:  # below the threshold: the very same arrays
        assert all(out[k] is g[k] for k in g)
        return
    factor = c / (n + eps_add)
    _close(out, {k: v * factor for k, v in g.items()}, rtol=1e-14)  # one common factor
    assert _gnorm(out) <= c * (1 + 1e-13)
    again = C.clip_by_global_norm(out, c, eps_add=eps_add)
    # idempotent up to rounding with eps_add = 0; torch's + 1e-6 shrinks again by ~1e-6 / c
    _close(again, out, rtol=1e-14 if eps_add == 0.0 else 2e-6 / c)


def test_torch_eps_add_clips_just_below_c():
    g = {"a": np.array([3.0, 4.0])}  # norm 5
    c = 5.0 + 5e-7  # n < c < n + 1e-6
    assert C.clip_by_global_norm(g, c)["a"] is g["a"]
    shrunk = C.clip_by_global_norm(g, c, eps_add=1e-6)["a"]
    np.testing.assert_allclose(shrunk, g["a"] * c / (5.0 + 1e-6), rtol=1e-15)
    assert np.all(shrunk < g["a"])


# Where the global norm n lies against the threshold c, in units of torch's eps_add = 1e-6:
# n = c + 1e-6 (offset + t), t in [0.01, 0.99].
NORM_ZONES = {"below c - eps": -2.0, "in (c - eps, c]": -1.0, "above c": 0.0}


@given(seed=seeds, log_c=st.floats(-3.0, 3.0), zone=st.sampled_from(sorted(NORM_ZONES)),
       t=st.floats(0.01, 0.99))
def test_eps_add_clips_only_inside_c_minus_eps(seed, log_c, zone, t):
    """min(1, c / (n + eps_add)) changes g exactly when n > c - eps_add: torch's eps_add = 1e-6
    clips, beyond the paper's rule, only the gradients whose norm lies in (c - 1e-6, c]."""
    c = 10.0**log_c
    n = c + 1e-6 * (NORM_ZONES[zone] + t)
    g0 = oh.tree(np.random.default_rng(seed), SHAPES_OUT_FIRST)
    g = {k: v * (n / _gnorm(g0)) for k, v in g0.items()}
    # g's norm as the oracle computes it is n (1 + d) with |d| below ~ (numel + 10) 2^-53 < 1e-13;
    # n stays >= 1e-8 away from c - 1e-6 and c, which is >= 1e-11 n (n <= 1e3 + 2e-6): the zone
    # decides every comparison.
    clipped = {}
    for eps_add in (0.0, 1e-6):
        out = C.clip_by_global_norm(g, c, eps_add=eps_add)
        clipped[eps_add] = n > c - eps_add
        for k, v in g.items():
            if clipped[eps_add]:
                # the factor is below 1 by >= 1e-8 / (n + eps_add) >= 1e-11 >> 2^-53
                nonzero = v != 0
                assert np.all(np.abs(out[k][nonzero]) < np.abs(v[nonzero])), (eps_add, k)
            else:
                np.testing.assert_array_equal(out[k], v, err_msg=f"{eps_add} {k}")
    assert (clipped[1e-6] != clipped[0.0]) == (zone == "in (c - eps, c]")


def test_nan_norm_poisons_every_gradient_as_frameworks_do():
    g = {"a": np.array([np.nan, 1.0]), "b": np.array([1.0, 2.0])}
    out = C.clip_by_global_norm(g, 1.0)
    assert np.all(np.isnan(out["b"]))


@pytest.mark.checks("per_tensor_clip_norm_at_most_c", "per_tensor_clip_keeps_each_direction",
                    "per_tensor_clip_below_threshold_bit_identical", "per_tensor_clip_idempotent",
                    "rms_measure_is_norm_with_c_sqrt_numel", "single_tensor_equals_global_clip")
@given(seed=seeds, log_scale=log_scales, c=st.floats(1e-2, 1e2))
def test_per_tensor_clip_bounds_each_tensor(seed, log_scale, c):
    rng = np.random.default_rng(seed)
    g = oh.tree(rng, SHAPES_OUT_FIRST, 10.0**log_scale)
    out = C.clip_per_tensor(g, c)
    for k, v in g.items():
        n = float(np.linalg.norm(v))
        if n <= c:
            assert out[k] is v
        else:
            np.testing.assert_allclose(out[k], v * (c / n), rtol=1e-14)
            assert np.linalg.norm(out[k]) <= c * (1 + 1e-13)
        np.testing.assert_allclose(C.clip_per_tensor({k: out[k]}, c)[k], out[k], rtol=1e-14)  # idempotent
        # a single tensor: per-tensor clipping is global clipping
        np.testing.assert_array_equal(C.clip_by_global_norm({k: v}, c)[k], out[k])
    # RMS measure = norm measure with the bound c sqrt(numel)
    rms = C.clip_per_tensor(g, c, measure="rms")
    for k, v in g.items():
        np.testing.assert_allclose(rms[k], C.clip_per_tensor({k: v}, c * np.sqrt(v.size))[k], rtol=1e-14)


def _agc_trees(seed: int, layout: str, log_w: float, log_g: float) -> tuple[dict, dict]:
    """Weights and gradients of the layout's shapes; each unit's gradient scaled by 1e-4, 1 or
    1e4, so some units sit far below the clipping threshold and some far above."""
    rng = np.random.default_rng(seed)
    shapes = SHAPES_OUT_LAST if layout == "out_last" else SHAPES_OUT_FIRST
    w = oh.tree(rng, shapes, 10.0**log_w)
    g = {k: v * rng.choice([1e-4, 1.0, 1e4], size=v.shape[:1] + (1,) * (v.ndim - 1))
         for k, v in oh.tree(rng, shapes, 10.0**log_g).items()}
    return w, g


@pytest.mark.checks("agc_unit_norm_at_most_lambda_max_w_eps", "agc_unchanged_units_bit_identical",
                    "agc_idempotent")
@given(seed=seeds, log_w=log_scales, log_g=log_scales, lam=st.floats(1e-3, 1.0),
       layout=st.sampled_from(C.UNIT_LAYOUTS), guarded=st.booleans())
def test_agc_invariants(seed, log_w, log_g, lam, layout, guarded):
    w, g = _agc_trees(seed, layout, log_w, log_g)
    eps = 1e-3
    out = C.adaptive_grad_clip(w, g, clipping=lam, eps=eps, layout=layout, compare_guarded=guarded)
    for k in g:
        gn, wn = C.unitwise_norm(g[k], layout), C.unitwise_norm(w[k], layout)
        limit = lam * np.maximum(wn, eps)
        on = np.broadcast_to(np.maximum(gn, 1e-6) if guarded else gn, g[k].shape) > np.broadcast_to(limit, g[k].shape)
        np.testing.assert_array_equal(out[k][~on], g[k][~on])  # unchanged units bit-identical
        assert np.all(C.unitwise_norm(out[k], layout) <= limit * (1 + 1e-12) + 1e-300)
        # each unit keeps its direction: out = s g with s in (0, 1]
        ratio = np.where(g[k] != 0, out[k] / np.where(g[k] != 0, g[k], 1.0), 1.0)
        assert np.all((ratio > 0) & (ratio <= 1 + 1e-15))
    again = C.adaptive_grad_clip(w, out, clipping=lam, eps=eps, layout=layout, compare_guarded=guarded)
    _close(again, out, rtol=1e-14)  # idempotent up to rounding


@given(seed=seeds, log_w=log_scales, log_g=log_scales, lam=st.floats(1e-3, 1.0),
       layout=st.sampled_from(C.UNIT_LAYOUTS), guarded=st.booleans())
def test_agc_keeps_each_unit_direction(seed, log_w, log_g, lam, layout, guarded):
    """Eq. 3 rescales each unit as a whole: AGC(G)_i = s_i G_i with one s_i in (0, 1] per unit."""
    w, g = _agc_trees(seed, layout, log_w, log_g)
    out = C.adaptive_grad_clip(w, g, clipping=lam, compare_guarded=guarded, layout=layout)
    u = 2.0**-53
    for k, v in g.items():
        # out = fl(v s_i) with s_i = fl(limit / norm) <= 1 shared by the unit, so out / v is
        # s_i (1 + d), |d| <= 2u + u^2: within a unit the ratios agree to 4u s_i (5u hi covers the
        # u^2 terms) and stay <= 1 + 2u (the float next to 1 is 1 + 2u).
        ratio = np.where(v != 0, out[k] / np.where(v != 0, v, 1.0), np.nan)
        axes = C.unit_axes(v.shape, layout)
        hi, lo = np.nanmax(ratio, axis=axes, keepdims=True), np.nanmin(ratio, axis=axes, keepdims=True)
        assert np.all(lo > 0) and np.all(hi <= 1 + 2 * u), k
        assert np.all(hi - lo <= 5 * u * hi), k


@pytest.mark.checks("agc_layouts_agree_on_transposed_weights", "agc_scale_equivariant_in_w_and_g")
@given(seed=seeds, lam=st.floats(1e-3, 1.0), k=st.integers(-20, 20))
def test_agc_layouts_agree_on_transposed_weights_and_scale_exactly(seed, lam, k):
    rng = np.random.default_rng(seed)
    w = {"conv": rng.standard_normal((8, 3, 3, 3)), "fc": rng.standard_normal((10, 16)), "b": rng.standard_normal(10)}
    g = {n: rng.standard_normal(v.shape) * 10.0 ** rng.uniform(-2, 2) for n, v in w.items()}
    first = C.adaptive_grad_clip(w, g, clipping=lam, layout="out_first")
    to_last = {"conv": lambda x: np.transpose(x, (2, 3, 1, 0)), "fc": lambda x: x.T, "b": lambda x: x}
    last = C.adaptive_grad_clip({n: to_last[n](v) for n, v in w.items()},
                                {n: to_last[n](v) for n, v in g.items()}, clipping=lam, layout="out_last")
    for n in w:
        np.testing.assert_allclose(to_last[n](first[n]), last[n], rtol=1e-14)
    # a power of two scales every norm exactly: AGC(2^k W, 2^k G) = 2^k AGC(W, G) (eps floor inactive)
    s = 2.0**k
    if all(np.min(C.unitwise_norm(v)) * min(s, 1.0) > 1e-3 for v in w.values()):
        scaled = C.adaptive_grad_clip({n: s * v for n, v in w.items()}, {n: s * v for n, v in g.items()},
                                      clipping=lam)
        for n in w:
            np.testing.assert_array_equal(scaled[n], s * first[n])


def test_unit_axes_per_layout():
    assert C.unit_axes((8, 3, 3, 3), "out_first") == (1, 2, 3)
    assert C.unit_axes((4, 6, 5), "out_first") == (1, 2)
    assert C.unit_axes((4, 6, 5), "out_first_3d_dim1") == (1,)
    assert C.unit_axes((8, 3, 3, 3), "out_first_3d_dim1") == (1, 2, 3)
    assert C.unit_axes((3, 3, 4, 8), "out_last") == (0, 1, 2)
    assert C.unit_axes((6, 4, 5), "out_last") == (0,)
    assert C.unit_axes((1, 7), "out_last") is None  # squeeze(x).ndim <= 1: a vector
    assert C.unit_axes((1, 7), "out_first") == (1,)
    assert C.unit_axes((7,), "out_last") is None and C.unit_axes((), "out_first") is None


def test_mask_leaves_unselected_gradients_alone():
    rng = np.random.default_rng(0)
    w, g = oh.tree(rng, SHAPES_OUT_FIRST), oh.tree(rng, SHAPES_OUT_FIRST, 100.0)
    out = C.adaptive_grad_clip(w, g, mask="ndim>=2")
    assert out["conv/bias"] is g["conv/bias"] and out["fc/bias"] is g["fc/bias"]
    assert not np.array_equal(out["fc/weight"], g["fc/weight"])


def test_raw_functions_keep_float32():
    rng = np.random.default_rng(0)
    w = oh.as_float32(oh.tree(rng, SHAPES_OUT_FIRST))
    g = oh.as_float32(oh.tree(rng, SHAPES_OUT_FIRST, 10.0))
    for step, init in ((C.step_agc, C.init_agc), (C.step_global_norm_clip, C.init_global_norm_clip),
                       (C.step_per_tensor_clip, C.init_per_tensor_clip)):
        new, _ = step.__wrapped__(w, g, init.__wrapped__(w), lr=1e-2, weight_decay=1e-3)
        assert all(v.dtype == np.float32 for v in new.values()), step.__name__


# ------------------------------------------------------------------------------------------
# The optimizer ops and the harness form
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["global_norm_clip", "per_tensor_clip", "agc"])
def test_harness_form_and_sgd_on_clipped_gradient(name):
    rng = np.random.default_rng(1)
    w, g = oh.tree(rng, SHAPES_OUT_FIRST), oh.tree(rng, SHAPES_OUT_FIRST, 3.0)
    op = reference.get(name)
    flat = oh.flat(w, g)
    out, state = op.apply(flat, None, lr=0.1, weight_decay=0.01)
    assert float(state["step"]) == 1.0
    clipped = {"global_norm_clip": lambda: C.clip_by_global_norm(g, 1.0),
               "per_tensor_clip": lambda: C.clip_per_tensor(g, 1.0),
               "agc": lambda: C.adaptive_grad_clip(w, g)}[name]()
    for k in w:
        np.testing.assert_allclose(out[f"params/{k}"], w[k] - 0.1 * (clipped[k] + 0.01 * w[k]), rtol=1e-15)
    out2, state2 = op.apply({**flat, **{f"params/{k}": out[f"params/{k}"] for k in w}}, state, lr=0.1)
    assert float(state2["step"]) == 2.0


# ------------------------------------------------------------------------------------------
# (2) float64 trajectories against the frameworks
# ------------------------------------------------------------------------------------------

STEPS = 12
LRS = [1e-2] * 6 + [5e-3] * 6  # a mid-run lr change


def _grads(rng, shapes, i):
    return oh.tree(rng, shapes, 3.0 if i % 2 else 0.05)  # alternately clipped and not


def _problem(shapes, seed):
    rng = np.random.default_rng(seed)
    w0 = oh.tree(rng, shapes)
    return w0, [_grads(rng, shapes, i) for i in range(STEPS)]


def _torch_run(shapes, clip_fn, weight_decay, seed=3):
    """torch.optim.SGD after ``clip_fn(parameters)`` at every step: w0, the gradients, the last weights."""
    torch = pytest.importorskip("torch")
    w0, grads = _problem(shapes, seed)
    tensors = oh.torch_tensors(w0)
    opt = torch.optim.SGD(list(tensors.values()), lr=LRS[0], weight_decay=weight_decay)
    return w0, grads, oh.torch_steps(opt, tensors, grads, LRS, before_step=clip_fn)[-1][0]


def _oracle_run(name, w0, grads, **hp):
    return oh.trajectory(reference.get(name), w0, grads, LRS, **hp)[-1][0]


def test_torch_clip_grad_norm_then_sgd():
    torch = pytest.importorskip("torch")
    w0, grads, got = _torch_run(SHAPES_OUT_FIRST, lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.5), 1e-2)
    want = _oracle_run("global_norm_clip", w0, grads, max_norm=1.5, eps_add=1e-6, weight_decay=1e-2)
    assert oh.rel_elementwise(got, want) < RTOL


def test_torch_clip_grad_norm_per_tensor_then_sgd():
    torch = pytest.importorskip("torch")

    def per_tensor(ps):
        for p in ps:
            torch.nn.utils.clip_grad_norm_([p], 0.7)

    w0, grads, got = _torch_run(SHAPES_OUT_FIRST, per_tensor, 1e-2)
    want = _oracle_run("per_tensor_clip", w0, grads, max_norm=0.7, eps_add=1e-6, weight_decay=1e-2)
    assert oh.rel_elementwise(got, want) < RTOL


def test_pytorch_optimizer_agc_then_sgd():
    pytest.importorskip("torch")
    po = pytest.importorskip("pytorch_optimizer")

    def agc(ps):
        for p in ps:
            p.grad.copy_(po.agc(p.detach(), p.grad, 1e-3, 0.02))

    w0, grads, got = _torch_run(SHAPES_OUT_FIRST, agc, 1e-2)
    want = _oracle_run("agc", w0, grads, clipping=0.02, layout="out_first_3d_dim1", compare_guarded=True,
                       weight_decay=1e-2)
    assert oh.rel_elementwise(got, want) < RTOL
    # the 3-D tensor tells the layouts apart
    other = _oracle_run("agc", w0, grads, clipping=0.02, layout="out_first", weight_decay=1e-2)
    assert oh.rel_elementwise({"a": got["attn/weight"]}, {"a": other["attn/weight"]}) > 1e-6


def _optax_run(shapes, clip, weight_decay, seed=4):
    """optax.sgd after ``clip`` and the decay: w0, the gradients, the last weights."""
    _, optax = oh.optax_x64()
    w0, grads = _problem(shapes, seed)
    tx = optax.chain(clip, optax.add_decayed_weights(weight_decay), optax.sgd(oh.optax_schedule(LRS)))
    return w0, grads, oh.optax_steps(tx, w0, grads, jit=True)[-1][0]


def test_optax_clip_by_global_norm():
    optax = pytest.importorskip("optax")
    w0, grads, got = _optax_run(SHAPES_OUT_LAST, optax.clip_by_global_norm(1.5), 1e-2)
    assert next(iter(got.values())).dtype == np.float64
    want = _oracle_run("global_norm_clip", w0, grads, max_norm=1.5, eps_add=0.0, weight_decay=1e-2)
    assert oh.rel_elementwise(got, want) < RTOL


def test_optax_clip_by_block_rms():
    optax = pytest.importorskip("optax")
    w0, grads, got = _optax_run(SHAPES_OUT_LAST, optax.clip_by_block_rms(0.3), 1e-2)
    want = _oracle_run("per_tensor_clip", w0, grads, max_norm=0.3, measure="rms", weight_decay=1e-2)
    assert oh.rel_elementwise(got, want) < RTOL


def test_optax_adaptive_grad_clip():
    optax = pytest.importorskip("optax")
    w0, grads, got = _optax_run(SHAPES_OUT_LAST, optax.adaptive_grad_clip(0.05, eps=1e-3), 1e-2)
    want = _oracle_run("agc", w0, grads, clipping=0.05, layout="out_last", weight_decay=1e-2)
    assert oh.rel_elementwise(got, want) < RTOL
    # the (1, 7) row is one unit for optax (squeeze rule); per-column units would differ
    other = _oracle_run("agc", w0, grads, clipping=0.05, layout="out_first", weight_decay=1e-2)
    assert oh.rel_elementwise({"r": got["row"]}, {"r": other["row"]}) < RTOL  # (1, n): dims 1.. = whole
    assert oh.rel_elementwise({"a": got["fc/weight"]}, {"a": other["fc/weight"]}) > 1e-6


# ------------------------------------------------------------------------------------------
# (3) bad input
# ------------------------------------------------------------------------------------------


# The ops' bad input is their specs' [[error_cases]]; these helpers are not ops.
def test_bad_helper_arguments_name_the_argument():
    with pytest.raises(ValueError, match="layout"):
        C.unitwise_norm(np.ones((2, 2)), "hwio")
    with pytest.raises(ValueError, match="max_norm"):
        C.clip_by_global_norm({"w": np.ones((2, 3))}, -1.0)
