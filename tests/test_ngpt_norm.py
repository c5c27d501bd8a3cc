"""nGPT: the normalized residual update (forward and gradients vs mpmath on adversarial data, the
hypersphere properties, the official update in torch float64 autograd), the post-step weight
projection composed with AdamW as the official training loop does, and harness mutants."""

from __future__ import annotations

import math

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
    mp_sqrt,
    relative_error,
    run_mutant,
    t64,
    torch_or_skip,
    verdict_table,
)
from mutants import Control, Mutant
from reference.normalizers.ngpt_norm import ngpt_norm, rate_factor
from reference.optimizers import adam
from reference.optimizers.ngpt_projection import NGPT_AXES, ngpt_axis, project_to_sphere, projected

OP = reference.get("ngpt_norm")
RNG = np.random.default_rng(20260413)
U = 2.0**-53


def _inputs(rng, shape):
    return rng.standard_normal(shape), rng.standard_normal(shape), 1 + 0.5 * rng.standard_normal(shape[-1])


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# --- accuracy ---------------------------------------------------------------------------------


def _mp_norm(V):
    return mp_sqrt(np.sum(V * V, axis=-1, keepdims=True))


def _mp_sphere_vjp(W, Uv, r):
    return (W - Uv * np.sum(Uv * W, axis=-1, keepdims=True)) / r


def mp_ngpt(h, hb, alpha, dy, c):
    """Eq. 1-4 and their VJP (tangent projections, module docstring) at 50 digits: (y, dh, dhb, dalpha)."""
    H, HB, DY = mp_array(h), mp_array(hb), mp_array(dy)
    raw = mp_array(alpha) * mp_array(np.float64(c))
    lr = np.abs(raw)
    r_a, r_b = _mp_norm(H), _mp_norm(HB)
    A, B = H / r_a, HB / r_b
    res = A + lr * (B - A)
    r_y = _mp_norm(res)
    Y = res / r_y
    d_res = _mp_sphere_vjp(DY, Y, r_y)
    d_lr = np.sum(d_res * (B - A), axis=tuple(range(h.ndim - 1)))
    sign = np.array([1 if v > 0 else -1 for v in raw], dtype=object)
    return (Y, _mp_sphere_vjp((1 - lr) * d_res, A, r_a), _mp_sphere_vjp(lr * d_res, B, r_b),
            d_lr * mp_array(np.float64(c)) * sign)


@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_forward_and_gradients_match_mpmath_on_adversarial_data(family):
    """h from the family, h_block from it with another draw (both can be near 1e+-150, constant,
    at an offset of 1e8 with spread 1e-3, twelve decades apart), alpha at a few effective rates."""
    x = adversarial(family, (3, 4, 8))
    h, hb = x[:, :2], x[:, 2:]
    alpha = RNG.uniform(0.2, 3.0, 8) * np.where(RNG.random(8) < 0.3, -1.0, 1.0)
    dy = RNG.standard_normal(h.shape)
    inputs = {"h": h, "h_block": hb, "alpha": alpha}
    y = OP.apply(inputs, None)[0]["y"]
    grads = OP.vjp(inputs, None, {"y": dy})
    Y, DH, DHB, DA = mp_ngpt(h, hb, alpha, dy, rate_factor(8, 0.05, None))
    errors = {"y": relative_error(y, Y), "h": relative_error(grads["h"], DH),
              "h_block": relative_error(grads["h_block"], DHB), "alpha": relative_error(grads["alpha"], DA)}
    # Norms and projections of 8 values: a few tens of roundings; the tangent projections of the
    # gradients stay within a few tens of ulps (B - A without cancellation: ngpt_norm._difference).
    assert errors["y"] <= 40 * U, errors
    assert max(errors.values()) <= 1e-14, errors


def test_the_human_api_and_dialect():
    h, hb, alpha = _inputs(np.random.default_rng(93), (4, 6))  # its own draws: independent of test order
    y = ngpt_norm(h, hb, alpha)
    lr = np.abs(alpha * 0.05 * math.sqrt(6))  # alpha_scale None: 1/sqrt(d)
    # The rows have unit norm, so 1e-15 absolute is relative to the row: the restated formula's
    # own difference of unit vectors cancels in an element near 0 (5e-14 of that element).
    np.testing.assert_allclose(y, _unit(_unit(h) + lr * (_unit(hb) - _unit(h))), rtol=1e-14, atol=1e-15)
    official = OP.dialect("official")
    assert official["alpha_scale"] is None and official["alpha_abs"] and official["normalize_h"]
    assert official["alpha_init"] == 0.05 and OP.spec.backward == "exact"


# --- properties -------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 4), st.integers(2, 16))
seeds = st.integers(0, 2**32 - 1)
knobs = st.fixed_dictionaries({"alpha_abs": st.booleans(), "normalize_h": st.booleans()})


@given(shape=shapes, seed=seeds, hp=knobs, log_scale=st.floats(-3, 3))
def test_output_on_the_unit_sphere(shape, seed, hp, log_scale):
    h, hb, alpha = _inputs(np.random.default_rng(seed), shape)
    y = ngpt_norm(h * 10.0**log_scale, hb, alpha * 3, **hp)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, rtol=(shape[1] + 8) * U)


@given(shape=shapes, seed=seeds)
def test_zero_rate_keeps_the_state(shape, seed):
    """alpha = 0: lr = 0, y = Norm(Norm(h)) = Norm(h) whatever the block says."""
    h, hb, _ = _inputs(np.random.default_rng(seed), shape)
    np.testing.assert_allclose(ngpt_norm(h, hb, np.zeros(shape[1])), _unit(h), rtol=4 * shape[1] * U, atol=4 * U)


@given(shape=shapes, seed=seeds, alpha_init=st.floats(0.01, 1.0))
def test_unit_rate_takes_the_block_output(shape, seed, alpha_init):
    """lr = 1 (alpha = alpha_scale / alpha_init): y = Norm(h_block), the block's output alone."""
    h, hb, _ = _inputs(np.random.default_rng(seed), shape)
    alpha = np.full(shape[1], 1.0 / (alpha_init * math.sqrt(shape[1])))
    y = ngpt_norm(h, hb, alpha, alpha_init=alpha_init)
    np.testing.assert_allclose(y, _unit(hb), rtol=0, atol=16 * shape[1] * U)


@given(shape=shapes, seed=seeds, rate=st.floats(0.0, 1.0))
def test_step_stays_in_the_plane_of_a_and_b(shape, seed, rate):
    """A rate shared by every dimension moves A along the great circle toward B: y lies in
    span(A, B), between them (angle(A, y) + angle(y, B) = angle(A, B)), at an angle from A that
    grows with the rate.  (Per-dimension rates leave the plane: nGPT's eigen learning rates.)"""
    h, hb, _ = _inputs(np.random.default_rng(seed), (shape[0], max(shape[1], 3)))
    d = h.shape[1]
    alpha = np.full(d, rate / (0.05 * math.sqrt(d)))
    y = ngpt_norm(h, hb, alpha)
    a, b = _unit(h), _unit(hb)
    basis = np.stack([a, b], axis=-1)                                    # (rows, d, 2)
    coef = np.linalg.lstsq(basis[0], y[0], rcond=None)[0]
    np.testing.assert_allclose(basis[0] @ coef, y[0], atol=1e-13)

    def angle(u, v):
        return np.arccos(np.clip(np.sum(u * v, axis=-1), -1, 1))

    np.testing.assert_allclose(angle(a, y) + angle(y, b), angle(a, b), atol=1e-7)


@given(shape=shapes, seed=seeds, log_a=st.floats(-3, 3), log_b=st.floats(-3, 3))
def test_invariant_to_positive_scaling_of_inputs(shape, seed, log_a, log_b):
    """Norm makes y depend on h and h_block only through their directions: scaling them by a, b >
    0 leaves y and dalpha alone and divides dh by a, dh_block by b."""
    rng = np.random.default_rng(seed)
    h, hb, alpha = _inputs(rng, shape)
    dy = rng.standard_normal(shape)
    a, b = 10.0**log_a, 10.0**log_b
    one = OP.backward({"h": h, "h_block": hb, "alpha": alpha}, None, {"y": dy})[0]
    two = OP.backward({"h": a * h, "h_block": b * hb, "alpha": alpha}, None, {"y": dy})[0]
    np.testing.assert_allclose(ngpt_norm(a * h, b * hb, alpha), ngpt_norm(h, hb, alpha), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(two["h"] * a, one["h"], rtol=1e-11, atol=1e-13 * np.abs(one["h"]).max())
    np.testing.assert_allclose(two["h_block"] * b, one["h_block"], rtol=1e-11,
                               atol=1e-13 * np.abs(one["h_block"]).max())
    np.testing.assert_allclose(two["alpha"], one["alpha"], rtol=1e-11, atol=1e-13 * np.abs(one["alpha"]).max())


@given(shape=shapes, seed=seeds)
def test_renormalized_state_matches_paper_form_on_the_sphere(shape, seed):
    """For a unit h (every state nGPT carries) the official re-normalization of h changes
    nothing in y; its gradient w.r.t. h is the paper form's projected on the tangent plane at h."""
    rng = np.random.default_rng(seed)
    h, hb, alpha = _inputs(rng, shape)
    h = _unit(h)
    dy = rng.standard_normal(shape)
    np.testing.assert_allclose(ngpt_norm(h, hb, alpha), ngpt_norm(h, hb, alpha, normalize_h=False),
                               rtol=1e-14, atol=1e-15)
    official = OP.vjp({"h": h, "h_block": hb, "alpha": alpha}, None, {"y": dy})
    paper = OP.vjp({"h": h, "h_block": hb, "alpha": alpha}, None, {"y": dy}, normalize_h=False)
    tangent = paper["h"] - h * np.sum(h * paper["h"], axis=-1, keepdims=True)
    np.testing.assert_allclose(official["h"], tangent, rtol=1e-12, atol=1e-13 * np.abs(paper["h"]).max())
    for key in ("h_block", "alpha"):
        np.testing.assert_allclose(official[key], paper[key], rtol=1e-12, atol=1e-13)


@given(shape=shapes, seed=seeds, alpha_init=st.floats(0.01, 0.5), alpha_scale=st.floats(1e-3, 1.0))
def test_effective_rate_is_alpha_times_init_over_scale(shape, seed, alpha_init, alpha_scale):
    """Eq. 3: a parameter at its initial value alpha_scale steps with the rate alpha_init; the
    default alpha_scale is 1/sqrt(d) (the official base_scale); |.| makes -alpha the same step."""
    h, hb, _ = _inputs(np.random.default_rng(seed), shape)
    d = shape[1]
    expected = _unit(_unit(h) + alpha_init * (_unit(hb) - _unit(h)))
    hp = {"alpha_init": alpha_init, "alpha_scale": alpha_scale}
    np.testing.assert_allclose(ngpt_norm(h, hb, np.full(d, alpha_scale), **hp), expected, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ngpt_norm(h, hb, np.full(d, -alpha_scale), **hp), expected, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ngpt_norm(h, hb, np.full(d, 1 / math.sqrt(d)), alpha_init=alpha_init), expected,
                               rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("which", ["h", "h_block"])
def test_zero_vector_gives_nan(which):
    """The official justnorm has no eps: a zero row of h or h_block is 0/0 = NaN in its output
    row and its gradient rows (alpha's gradient sums over the rows: NaN too); other rows are
    untouched.  (l2_normalize with eps = 0 gives 0 there instead.)"""
    h, hb, alpha = _inputs(RNG, (3, 5))
    inputs = {"h": h, "h_block": hb, "alpha": alpha}
    inputs[which] = inputs[which].copy()
    inputs[which][1] = 0.0
    y = OP.apply(inputs, None)[0]["y"]
    grads = OP.vjp(inputs, None, {"y": RNG.standard_normal((3, 5))})
    assert np.all(np.isnan(y[1])) and np.all(np.isfinite(y[[0, 2]]))
    assert np.all(np.isnan(grads[which][1])) and np.all(np.isfinite(grads[which][[0, 2]]))
    assert np.all(np.isnan(grads["alpha"]))
    torch = torch_or_skip()
    zero = torch.zeros(5, dtype=torch.float64)
    assert torch.isnan(zero / zero.norm(p=2, dim=-1, keepdim=True)).all()  # model.py Block.justnorm


@given(shape=shapes, seed=seeds, hp=knobs)
def test_grads_orthogonal_to_the_normalized_inputs(shape, seed, hp):
    """y depends on h_block only through B = Norm(h_block) (and on h through A = Norm(h) when h
    is re-normalized): the gradients are tangent to the sphere there, <dh_block, B> = 0."""
    rng = np.random.default_rng(seed)
    h, hb, alpha = _inputs(rng, shape)
    grads = OP.vjp({"h": h, "h_block": hb, "alpha": alpha}, None, {"y": rng.standard_normal(shape)}, **hp)
    scale = np.abs(grads["h_block"]).max() + np.abs(grads["h"]).max()
    np.testing.assert_allclose(np.sum(grads["h_block"] * _unit(hb), axis=-1), 0.0, atol=1e-14 * scale * shape[1])
    if hp["normalize_h"]:
        np.testing.assert_allclose(np.sum(grads["h"] * _unit(h), axis=-1), 0.0, atol=1e-14 * scale * shape[1])


def _official_update(torch, h, h_att, attn_alpha, n_embd):
    """The attention update of NVIDIA/ngpt model.py Block.forward (use_nGPT = 1), restated in
    torch: justnorm, lr = |alpha (0.05 / base_scale)|, A + lr (B - A), justnorm."""
    base_scale = 1.0 / n_embd**0.5

    def justnorm(x):
        return x / x.norm(p=2, dim=-1, keepdim=True)

    lr = torch.abs(attn_alpha * (0.05 / base_scale))
    a_norm, b_norm = justnorm(h), justnorm(h_att)
    return justnorm(a_norm + lr * (b_norm - a_norm))


@pytest.mark.parametrize("shape", [(2, 5, 16), (3, 32)])
def test_matches_official_block_update_in_torch(shape):
    torch = torch_or_skip()
    h, hb, alpha = _inputs(RNG, shape)
    alpha = alpha / math.sqrt(shape[-1])  # stored near base_scale, as the official parameter
    alpha[0] = -alpha[0]
    th, thb, ta = t64(h, True), t64(hb, True), t64(alpha, True)
    ty = _official_update(torch, th, thb, ta, shape[-1])
    dy = RNG.standard_normal(shape)
    expected = dict(zip(("h", "h_block", "alpha"), torch.autograd.grad(ty, [th, thb, ta], t64(dy)), strict=True))
    inputs = {"h": h, "h_block": hb, "alpha": alpha}
    hp = OP.dialect("official")
    np.testing.assert_allclose(OP.apply(inputs, None, **hp)[0]["y"], ty.detach().numpy(), rtol=1e-14, atol=1e-15)
    grads = OP.vjp(inputs, None, {"y": dy}, **hp)
    for key, value in expected.items():
        ref = value.numpy()
        np.testing.assert_allclose(grads[key], ref, rtol=1e-12, atol=1e-13 * np.abs(ref).max(), err_msg=key)


# --- the post-step weight projection (optimizer side) ------------------------------------------


def _model_params(rng, d=8, v=11, proj=12):
    """Parameters named like the official model (one block), shapes as torch keeps them."""
    return {"transformer/wte/weight": rng.standard_normal((v, d)),
            "lm_head/weight": rng.standard_normal((v, d)),
            "transformer/h/0/query/weight": rng.standard_normal((d, d)),
            "transformer/h/0/key/weight": rng.standard_normal((d, d)),
            "transformer/h/0/value/weight": rng.standard_normal((d, d)),
            "transformer/h/0/att_c_proj/weight": rng.standard_normal((d, d)),
            "transformer/h/0/c_fc/weight": rng.standard_normal((2 * proj, d)),
            "transformer/h/0/mlp_c_proj/weight": rng.standard_normal((d, proj)),
            "transformer/h/0/attn_alpha": rng.uniform(0.5, 1.5, d) / math.sqrt(d),
            "transformer/h/0/sqk": rng.uniform(0.5, 1.5, d) / math.sqrt(d),
            "sz": rng.uniform(0.5, 1.5, v) / math.sqrt(d)}


def test_projection_puts_every_official_matrix_on_the_sphere():
    """train.py normalize_matrices: rows (dim 1) of wte, lm_head, query, key, value, c_fc and
    columns (dim 0) of att_c_proj, mlp_c_proj become unit vectors; the scaling vectors and eigen
    learning rates are left alone (the same arrays); projecting twice changes nothing."""
    params = _model_params(RNG)
    out = project_to_sphere(params)
    for path, x in params.items():
        axis = ngpt_axis(path, x)
        if axis is None:
            assert out[path] is x
            continue
        assert axis == NGPT_AXES[path.split("/")[-2]]
        np.testing.assert_allclose(np.linalg.norm(out[path], axis=axis), 1.0, rtol=20 * U)
        np.testing.assert_allclose(out[path], x / np.linalg.norm(x, axis=axis, keepdims=True), rtol=4 * U)
        np.testing.assert_allclose(project_to_sphere(out)[path], out[path], rtol=8 * U)
    nested = project_to_sphere({"block": {"query": {"weight": params["transformer/h/0/query/weight"]}}})
    np.testing.assert_array_equal(nested["block"]["query"]["weight"], out["transformer/h/0/query/weight"])


def test_projection_rules_and_bad_rules():
    x = RNG.standard_normal((3, 4))
    x[1] = 0.0
    out = project_to_sphere({"w": x, "b": np.ones(4)}, {"w": 1})
    assert np.all(np.isnan(out["w"][1])) and np.all(np.isfinite(out["w"][[0, 2]]))  # eps-free: NaN
    columns = project_to_sphere({"w": RNG.standard_normal((3, 4))}, lambda path, a: 0)["w"]
    np.testing.assert_allclose(np.linalg.norm(columns, axis=0), 1.0, rtol=8 * U)
    with pytest.raises(ValueError, match=r"axes names parameters \['v'\] that are not in params"):
        project_to_sphere({"w": x}, {"v": 1})
    with pytest.raises(ValueError, match=r"axis=2 of 'w' is out of range for an array with 2 dimensions"):
        project_to_sphere({"w": x}, {"w": 2})
    with pytest.raises(TypeError, match=r"the axis of 'w' must be an int or None, got 1.0"):
        project_to_sphere({"w": x}, {"w": 1.0})
    with pytest.raises(TypeError, match=r"axes must be a dict path -> axis or a callable"):
        project_to_sphere({"w": x}, 1)
    with pytest.raises(TypeError, match=r"project_to_sphere: w must have a real floating dtype"):
        project_to_sphere({"w": np.ones((2, 2), dtype=bool)}, {"w": 1})


def test_projection_composes_with_adamw_as_the_official_loop():
    """The official loop: AdamW step (weight decay 0 in the nGPT configuration, lr from the
    schedule), then normalize_matrices; five steps against torch.optim.AdamW + the official
    justnorm in float64 (without train.py's .float(), which the next test measures)."""
    torch = torch_or_skip()
    params = project_to_sphere(_model_params(RNG))  # the official loop normalizes once before training
    names = list(params)
    tparams = [torch.nn.Parameter(t64(params[n])) for n in names]
    opt = torch.optim.AdamW(tparams, lr=1.5e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=False)
    step = projected(adam.step_adamw)
    hp = {"lr": 1.5e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0}
    state = adam.init_adamw(params, **hp)
    for k in range(5):
        grads = {n: RNG.standard_normal(params[n].shape) for n in names}
        params, state = step(params, grads, state, **hp)
        for p, n in zip(tparams, names, strict=True):
            p.grad = t64(grads[n])
        opt.step()
        with torch.no_grad():
            for p, n in zip(tparams, names, strict=True):
                axis = ngpt_axis(n, p)
                if axis is not None:
                    p.copy_(p / p.norm(p=2, dim=axis, keepdim=True))
        for p, n in zip(tparams, names, strict=True):
            np.testing.assert_allclose(params[n], p.detach().numpy(), rtol=1e-13, atol=1e-15, err_msg=f"{n}, step {k}")
            axis = ngpt_axis(n, params[n])
            if axis is not None:
                np.testing.assert_allclose(np.linalg.norm(params[n], axis=axis), 1.0, rtol=20 * U)
    # The projection does not touch the optimizer's moments.
    plain_state = adam.step_adamw(params, grads, state, **hp)[1]
    projected_state = step(params, grads, state, **hp)[1]
    for slot in ("exp_avg", "exp_avg_sq"):
        for n in names:
            np.testing.assert_array_equal(projected_state[slot][n], plain_state[slot][n])


def test_official_train_loop_projects_float64_weights_in_float32():
    """train.py's justnorm(x, idim) = (x.float() / x.float().norm(...)).to(dtype): a float64
    weight comes back with float32 accuracy (a finding; the oracle projects in float64)."""
    torch_or_skip()
    w = RNG.standard_normal((16, 32))
    tw = t64(w)
    official = (tw.float() / tw.float().norm(p=2, dim=1, keepdim=True)).to(dtype=tw.dtype).numpy()
    oracle = project_to_sphere({"query/weight": w})["query/weight"]
    err = np.max(np.abs(official - oracle))
    assert 1e-9 < err < 1e-6, err  # float32 roundings, not float64 ones
    np.testing.assert_allclose(np.linalg.norm(oracle, axis=1), 1.0, rtol=20 * U)


# --- the harness flags plausible wrong implementations ----------------------------------------


class _NGPT(Mutant):
    op = "ngpt_norm"
    dtypes = ("float64",)  # the mistakes do not depend on the rounding


class NGPTAlphaGradUnscaled(_NGPT):
    """The gradient of the eigen learning rates stops at lr: d lr is returned as dalpha, without
    the chain rule through lr = |alpha alpha_init / alpha_scale| (the factor c sign(alpha c))."""

    def backward(self, ct, a, hp):
        grads = self.oracle_vjp(ct, a, hp)
        c = rate_factor(a["h"].shape[-1], hp["alpha_init"], hp["alpha_scale"])
        sign = np.sign(a["alpha"] * c) if hp["alpha_abs"] else 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            grads["alpha"] = np.where(sign != 0, grads["alpha"] / (c * sign), 0.0)
        return grads


class NGPTBlockGradNotProjected(_NGPT):
    """The gradient w.r.t. h_block skips the tangent projection of Norm: lr dres / ||h_block||,
    the derivative of h_block / ||h_block|| with the norm treated as a constant."""

    def backward(self, ct, a, hp):
        grads = self.oracle_vjp(ct, a, hp)
        h, hb = a["h"], a["h_block"]
        b = hb / np.linalg.norm(hb, axis=-1, keepdims=True)
        raw = a["alpha"] * rate_factor(hb.shape[-1], hp["alpha_init"], hp["alpha_scale"])
        lr = np.abs(raw) if hp["alpha_abs"] else raw
        a_vec = h / np.linalg.norm(h, axis=-1, keepdims=True) if hp["normalize_h"] else h
        res = a_vec + lr * (b - a_vec)
        r_y = np.linalg.norm(res, axis=-1, keepdims=True)
        y = res / r_y
        d_res = (ct["y"] - y * np.sum(y * ct["y"], axis=-1, keepdims=True)) / r_y
        grads["h_block"] = lr * d_res / np.linalg.norm(hb, axis=-1, keepdims=True)  # the mistake
        return grads


@pytest.mark.xdist_group("ngpt_norm")
@pytest.mark.parametrize("cls", [NGPTAlphaGradUnscaled, NGPTBlockGradNotProjected], ids=lambda c: c.__name__)
def test_mutants_are_flagged(cls):
    flagged, results = flagged_cases(cls())
    assert flagged >= MIN_FLAGGED, f"{cls.__name__} flagged by {flagged} cases:\n{verdict_table(results)}"


@pytest.mark.xdist_group("ngpt_norm")
def test_the_unmutated_control_is_not_flagged():
    """The mutants' plumbing without a mistake: no FAIL, ERROR or CONVENTION."""
    _, results = run_mutant(Control(_NGPT.op, _NGPT.dialect, _NGPT.dtypes))
    flagged = [r for r in results if r.verdict in ("FAIL", "ERROR", "CONVENTION")]
    assert not flagged, verdict_table(flagged)
