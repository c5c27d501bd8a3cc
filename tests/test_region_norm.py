"""Region Normalization (RN-B): forward vs mpmath on adversarial data, the paper's and the official
code's properties (regions normalized apart, a full mask is BatchNorm / InstanceNorm, empty regions,
the official fill-and-rescale identity), the official RN_B in torch autograd (float64), the official
RN_L as this op composed with its learned mask and spatial affine, and harness mutants."""

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
    mp,
    mp_array,
    relative_error,
    run_mutant,
    t64,
    torch_or_skip,
    verdict_table,
)
from mutants import Control, Mutant
from reference.normalizers.region_norm import region_norm

OP = reference.get("region_norm")
SEED = 20260701  # each test draws from its own generator: no order dependence
U = 2.0**-53  # unit roundoff of float64
PARAMS = ("foreground_weight", "foreground_bias", "background_weight", "background_bias")
SWAPPED = dict(zip(PARAMS, ("background_weight", "background_bias", "foreground_weight", "foreground_bias"),
                   strict=True))
KNOBS = {"statistics": ("sample", "batch"), "eps_scaling": ("none", "inverse_region_fraction"),
         "bias_placement": ("per_region", "summed")}


def group_axes(ndim, statistics):
    return tuple(range(2, ndim)) if statistics == "sample" else (0, *range(2, ndim))


def mp_region_norm(x, mask, params, eps, statistics, eps_scaling, bias_placement):
    """RN-B at 50 digits from the definition, independently of the oracle: an explicit loop over
    the reduction groups (one per sample and channel, or one per channel) and their two regions."""
    mpmath = mp()
    X, E = mp_array(x), mpmath.mpf(float(eps))
    fg = np.broadcast_to(mask, x.shape)
    n, c = x.shape[:2]
    get = {k: (np.ones(c) if "weight" in k else np.zeros(c)) if params.get(k) is None else params[k]
           for k in PARAMS}
    Y = np.zeros(x.shape, dtype=object)
    groups = [(slice(i, i + 1), j) for i in range(n) for j in range(c)] if statistics == "sample" \
        else [(slice(None), j) for j in range(c)]
    for group in groups:
        xs, inside_fg, ys = X[group], fg[group], Y[group]
        for inside, region in ((inside_fg, "foreground"), (~inside_fg, "background")):
            values = list(xs[inside])
            if not values:
                continue
            count = len(values)
            mu = mpmath.fsum(values) / count
            var = mpmath.fsum((v - mu) ** 2 for v in values) / count
            eps_r = E if eps_scaling == "none" else E * xs.size / count
            gamma = mpmath.mpf(float(get[f"{region}_weight"][group[1]]))
            beta = mpmath.mpf(float(get[f"{region}_bias"][group[1]])) if bias_placement == "per_region" else 0
            ys[inside] = np.array([(v - mu) / mpmath.sqrt(var + eps_r) * gamma + beta for v in values],
                                  dtype=object)
    if bias_placement == "summed":
        both = (mp_array(get["foreground_bias"]) + mp_array(get["background_bias"]))
        Y = Y + both.reshape((1, c) + (1,) * (x.ndim - 2))
    return Y


def forward_tolerance(n):
    """Relative bound of x_hat over a region of n values (module docstring): the shift and the
    centering take 2 roundings, the n squares and their sum n + 1, the root halves them; eps, the
    root, the reciprocal, the product and the affine add one each, and the mean's own error two."""
    return ((n + 1) / 2 + 8) * U


def draw(shape, rng, mask_shape=None, p=0.4, params=PARAMS):
    """x ~ N(0, 1), a mask True with probability p, and the given per-channel parameters."""
    n, c = shape[:2]
    mask = rng.random(mask_shape or (n, 1, *shape[2:])) < p
    inputs = {"x": rng.standard_normal(shape), "mask": mask}
    for k in params:
        inputs[k] = 1 + 0.5 * rng.standard_normal(c) if "weight" in k else rng.standard_normal(c)
    return inputs


def apply(inputs, **hp):
    return OP.apply(inputs, None, **hp)[0]["y"]


def vjp(inputs, dy, **hp):
    return OP.vjp(inputs, None, {"y": dy}, **hp)


def _per_group(v, inside, axes):
    """Sum of v over the region per reduction group, and the region's count."""
    return (np.sum(np.where(inside, v, 0.0), axis=axes, keepdims=True),
            np.sum(np.broadcast_to(inside, v.shape), axis=axes, keepdims=True))


def _region_affine(a, fg):
    """Per position: (gamma, beta) of the position's region (1 and 0 for absent parameters)."""
    shape = (1, -1, *[1] * (fg.ndim - 2))

    def param(name, default):
        return a[name].reshape(shape) if name in a else default

    return (np.where(fg, param("foreground_weight", 1.0), param("background_weight", 1.0)),
            np.where(fg, param("foreground_bias", 0.0), param("background_bias", 0.0)))


def scales(inputs, dy, hp):
    """Sizes an error is relative to, from the definition in NumPy: (x) dx's terms, max inv_std_r
    |gamma dy| (2 + x_hat^2); (params) the parameters' sums, sum |dy| (1 + |x_hat|); (centering)
    max |gamma| (|x| + |mu_r|) inv_std_r, what a rounding of x - mu_r relative to x itself costs
    (the official code's BatchNorm of the mean-filled region centers a one-pixel region to
    rounding noise, not to 0).  A gradient that cancels (a region of two values) is accurate
    relative to its terms, not to itself."""
    hp = {"eps": 1e-5, "statistics": "sample", "eps_scaling": "none", **hp}
    x = inputs["x"]
    fg = np.broadcast_to(inputs["mask"], x.shape)
    axes = group_axes(x.ndim, hp["statistics"])
    total = int(np.prod([x.shape[a] for a in axes]))
    gamma = _region_affine(inputs, fg)[0]
    terms = sums = centering = 0.0
    for inside in (fg, ~fg):
        sx, count = _per_group(x, inside, axes)
        safe = np.maximum(count, 1)
        mu = sx / safe
        var = _per_group((x - mu) ** 2, inside, axes)[0] / safe
        eps_r = hp["eps"] if hp["eps_scaling"] == "none" else hp["eps"] * total / safe
        inv_std = 1 / np.sqrt(var + eps_r)
        x_hat = (x - mu) * inv_std
        terms = max(terms, float(np.max(np.where(inside, inv_std * np.abs(gamma * dy) * (2 + x_hat**2), 0))))
        sums = max(sums, float(np.sum(np.where(inside, np.abs(dy) * (1 + np.abs(x_hat)), 0))))
        centering = max(centering, float(np.max(np.where(inside, np.abs(gamma) * (np.abs(x) + np.abs(mu))
                                                         * inv_std, 0))))
    return {"x": terms, "params": sums, "centering": centering}


def assert_grads_close(got, expected, inputs, dy, hp, names=None, k=8):
    """Gradients within k (n + 8) u of their terms' size (``scales``), n the group size."""
    x = inputs["x"]
    n = int(np.prod([x.shape[a] for a in group_axes(x.ndim, hp.get("statistics", "sample"))]))
    size = scales(inputs, dy, hp)
    for name in names or expected:
        scale = size["x" if name == "x" else "params"]
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=k * (n + 8) * U * scale, err_msg=name)


# --- forward accuracy -------------------------------------------------------------------------


@pytest.mark.parametrize("eps_kind", ["scaled", "default"])
@pytest.mark.parametrize("dialect", ["paper", "official"])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_forward_matches_mpmath_on_adversarial_data(family, dialect, eps_kind):
    """Per-sample and batch-wide region statistics within ((n+1)/2 + 8) u of mpmath (measured: at
    most 2.5 u).  No bias, so the error is judged against the normalized values themselves."""
    x = adversarial(family, (2, 3, 4, 5))
    inputs = draw(x.shape, np.random.default_rng(SEED), params=("foreground_weight", "background_weight"))
    inputs["x"] = x
    hp = OP.dialect(dialect)
    # 'scaled': eps 1e-3 of the data's variance, so the spread dominates on every scale.
    var = float(np.var(x))
    eps = 1e-3 * var if eps_kind == "scaled" and var > 0 else 1e-5
    y = apply(inputs, **{**hp, "eps": eps})
    exact = mp_region_norm(x, inputs["mask"], inputs, eps, hp["statistics"], hp["eps_scaling"],
                           hp["bias_placement"])
    n = int(np.prod([x.shape[a] for a in group_axes(x.ndim, hp["statistics"])]))
    err = relative_error(y, exact)
    assert err <= forward_tolerance(n), f"{family}, eps={eps:.3g}: relative error {err / U:.2f} u"


def test_a_region_mean_without_the_shift_would_fail_the_offset_family():
    """The accuracy test has teeth: sum(x in region) / S_r subtracted directly (one pass for the
    mean, as the official code's sum / Sr) misses the bound on data at 1e8 with spread 1e-3."""
    x = adversarial("offset_1e8_std_1e-3", (2, 3, 4, 5))
    mask = np.random.default_rng(SEED).random((2, 1, 4, 5)) < 0.4
    fg = np.broadcast_to(mask, x.shape)
    naive = np.zeros_like(x)
    for inside in (fg, ~fg):
        count = np.sum(inside, axis=(2, 3), keepdims=True)
        mu = np.sum(np.where(inside, x, 0), axis=(2, 3), keepdims=True) / count
        var = np.sum(np.where(inside, (x - mu) ** 2, 0), axis=(2, 3), keepdims=True) / count
        naive = np.where(inside, (x - mu) / np.sqrt(var + 1e-12), naive)
    exact = mp_region_norm(x, mask, {}, 1e-12, "sample", "none", "per_region")
    assert relative_error(naive, exact) > 100 * forward_tolerance(20)
    assert relative_error(apply({"x": x, "mask": mask}, eps=1e-12), exact) <= forward_tolerance(20)


# --- properties -------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(2, 5))
seeds = st.integers(0, 2**32 - 1)
knobs = st.fixed_dictionaries({k: st.sampled_from(v) for k, v in KNOBS.items()})
eps_values = st.sampled_from([1e-5, 1e-3, 0.5])


@given(shape=shapes, seed=seeds, hp=knobs, eps=eps_values)
def test_regions_standardized_separately(shape, seed, hp, eps):
    """Inside each region of each reduction group: mean 0 and variance var_r / (var_r + eps_r)."""
    inputs = draw(shape, rng=np.random.default_rng(seed), params=())
    x, fg = inputs["x"], np.broadcast_to(inputs["mask"], shape)
    y = apply(inputs, eps=eps, **hp)
    axes = group_axes(len(shape), hp["statistics"])
    total = int(np.prod([shape[a] for a in axes]))
    for inside in (fg, ~fg):
        sx, count = _per_group(x, inside, axes)
        seen = count > 0
        safe = np.maximum(count, 1)
        mu = sx / safe
        var = _per_group((x - mu) ** 2, inside, axes)[0] / safe
        eps_r = eps if hp["eps_scaling"] == "none" else eps * total / safe
        mean_y = _per_group(y, inside, axes)[0] / safe
        var_y = _per_group(y * y, inside, axes)[0] / safe
        bound = forward_tolerance(total) * 4  # both sums of n values, each term within the forward bound
        assert np.all(np.abs(mean_y[seen]) <= bound)
        np.testing.assert_allclose(var_y[seen], (var / (var + eps_r))[seen], rtol=bound, atol=bound)


@given(shape=shapes, seed=seeds, hp=knobs)
def test_other_region_does_not_matter(shape, seed, hp):
    """The foreground outputs (and gradients) are bit for bit the same whatever the background
    holds, a NaN or an inf included: each region's statistics see only its own positions."""
    rng = np.random.default_rng(seed)
    inputs = draw(shape, rng=rng)
    fg = np.broadcast_to(inputs["mask"], shape)
    changed = dict(inputs, x=np.where(fg, inputs["x"], 1e3 * rng.standard_normal(shape)))
    y, y2 = apply(inputs, **hp), apply(changed, **hp)
    np.testing.assert_array_equal(y[fg], y2[fg])
    dy = np.where(fg, rng.standard_normal(shape), 0.0)  # a loss of the foreground outputs alone
    np.testing.assert_array_equal(vjp(inputs, dy, **hp)["x"][fg], vjp(changed, dy, **hp)["x"][fg])
    poisoned = dict(inputs, x=np.where(fg, inputs["x"], np.inf))
    poisoned["x"][~fg & (rng.random(shape) < 0.5)] = np.nan
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(apply(poisoned, **hp)[fg], y[fg])


@given(shape=shapes, seed=seeds, eps_scaling=st.sampled_from(KNOBS["eps_scaling"]),
       bias_placement=st.sampled_from(KNOBS["bias_placement"]))
def test_full_mask_is_batch_norm(shape, seed, eps_scaling, bias_placement):
    """One region filling the batch (S = T, so eps T / S = eps): BatchNorm with batch statistics,
    gamma = the foreground weight, beta = the foreground bias (+ the background's when summed)."""
    rng = np.random.default_rng(seed)
    inputs = draw(shape, rng=rng)
    inputs["mask"] = np.ones((shape[0], 1, *shape[2:]), dtype=bool)
    if shape[0] * int(np.prod(shape[2:])) == 1:
        return  # BatchNorm refuses one value per channel; region_norm gives x_hat = 0 there
    hp = {"statistics": "batch", "eps_scaling": eps_scaling, "bias_placement": bias_placement}
    beta = inputs["foreground_bias"] + (inputs["background_bias"] if bias_placement == "summed" else 0)
    bn_inputs = {"x": inputs["x"], "weight": inputs["foreground_weight"], "bias": beta}
    bn = reference.get("batch_norm")
    bn_hp = {"training": True, "track_running_stats": False, "eps": 1e-5}
    expected = bn.apply(bn_inputs, None, **bn_hp)[0]["y"]
    n = shape[0] * int(np.prod(shape[2:]))
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(apply(inputs, **hp), expected, rtol=0, atol=2 * forward_tolerance(n) * scale)
    dy = rng.standard_normal(shape)
    g, g_bn = vjp(inputs, dy, **hp), bn.vjp(bn_inputs, None, {"y": dy}, **bn_hp)
    expected = {"x": g_bn["x"], "foreground_weight": g_bn["weight"], "foreground_bias": g_bn["bias"]}
    assert_grads_close(g, expected, inputs, dy, hp, k=2)
    np.testing.assert_array_equal(g["background_weight"], 0.0)  # the empty region
    np.testing.assert_array_equal(g["background_bias"], g["foreground_bias"] if bias_placement == "summed" else 0.0)


@given(shape=shapes, seed=seeds)
def test_full_mask_is_instance_norm(shape, seed):
    """Per-sample statistics and one region: InstanceNorm (affine with the foreground's gamma, beta)."""
    rng = np.random.default_rng(seed)
    if int(np.prod(shape[2:])) == 1:
        return
    inputs = draw(shape, rng=rng, params=("foreground_weight", "foreground_bias"))
    inputs["mask"] = np.ones((shape[0], shape[1], *shape[2:]), dtype=bool)
    in_inputs = {"x": inputs["x"], "weight": inputs["foreground_weight"], "bias": inputs["foreground_bias"]}
    inorm = reference.get("instance_norm")
    expected = inorm.apply(in_inputs, None, eps=1e-5)[0]["y"]
    n = int(np.prod(shape[2:]))
    np.testing.assert_allclose(apply(inputs), expected, rtol=0,
                               atol=2 * forward_tolerance(n) * np.max(np.abs(expected)))
    dy = rng.standard_normal(shape)
    g, g_in = vjp(inputs, dy), inorm.vjp(in_inputs, None, {"y": dy}, eps=1e-5)
    expected = {"x": g_in["x"], "foreground_weight": g_in["weight"], "foreground_bias": g_in["bias"]}
    assert_grads_close(g, expected, inputs, dy, {}, k=2)


@pytest.mark.parametrize("hp", [{}, OP.dialect("official"), {"statistics": "batch"}])
def test_empty_region_contributes_nothing(hp):
    """The stated convention: an all-False mask is the mirror of an all-True one (the empty
    foreground has no position to normalize, its S_r = 0 never divides), and a region empty in
    some samples only (per-sample statistics) leaves those samples to the other region; the empty
    region's weight gets zero gradient, its bias too unless the biases are summed everywhere."""
    rng = np.random.default_rng(SEED)
    inputs = draw((3, 2, 4, 4), rng)
    dy = rng.standard_normal((3, 2, 4, 4))
    none = dict(inputs, mask=np.zeros((3, 1, 4, 4), dtype=bool))
    every = {**{SWAPPED[k]: v for k, v in inputs.items() if k in PARAMS}, "x": inputs["x"],
             "mask": np.ones((3, 1, 4, 4), dtype=bool)}
    np.testing.assert_array_equal(apply(none, **hp), apply(every, **hp))
    g = vjp(none, dy, **hp)
    assert all(np.all(np.isfinite(v)) for v in g.values())
    np.testing.assert_array_equal(g["foreground_weight"], 0.0)
    summed = hp.get("bias_placement") == "summed"
    np.testing.assert_array_equal(g["foreground_bias"], np.sum(dy, axis=(0, 2, 3)) if summed else 0.0)
    np.testing.assert_array_equal(g["x"], vjp(every, dy, **hp)["x"])
    # Sample 0 all foreground, sample 1 all background, sample 2 split: per sample, the first two
    # are InstanceNorm with one region's affine.
    mask = rng.random((3, 1, 4, 4)) < 0.5
    mask[0], mask[1] = True, False
    y = apply(dict(inputs, mask=mask))
    inorm = reference.get("instance_norm")
    for i, region in ((0, "foreground"), (1, "background")):
        expected = inorm.apply({"x": inputs["x"][i:i + 1], "weight": inputs[f"{region}_weight"],
                                "bias": inputs[f"{region}_bias"]}, None)[0]["y"]
        np.testing.assert_allclose(y[i:i + 1], expected, rtol=0, atol=1e-14 * np.max(np.abs(expected)))


@given(shape=shapes, seed=seeds, hp=knobs, per_channel=st.booleans())
def test_complement_mask_swaps_the_regions(shape, seed, hp, per_channel):
    """Naming is all the mask decides: rn(x, ~m) with the two regions' parameters swapped is rn(x, m),
    bit for bit, and so are the gradients (swapped back)."""
    rng = np.random.default_rng(seed)
    inputs = draw(shape, mask_shape=shape if per_channel else None, rng=rng)
    flipped = {**{SWAPPED[k]: v for k, v in inputs.items() if k in PARAMS}, "x": inputs["x"],
               "mask": ~inputs["mask"]}
    np.testing.assert_array_equal(apply(flipped, **hp), apply(inputs, **hp))
    dy = rng.standard_normal(shape)
    g, g_flipped = vjp(inputs, dy, **hp), vjp(flipped, dy, **hp)
    np.testing.assert_array_equal(g["x"], g_flipped["x"])
    for k in PARAMS:
        np.testing.assert_array_equal(g[k], g_flipped[SWAPPED[k]])


def official_rn(x, mask, eps, statistics):
    """The official ``rn(region, mask)`` restated in NumPy on the oracle's own BatchNorm /
    InstanceNorm: the region's mean outside the region, standardized over the group, times
    sqrt(S_r / T); 0 outside the region."""
    axes = group_axes(x.ndim, statistics)
    m = np.broadcast_to(mask, x.shape).astype(float)
    region = x * m
    count = np.sum(m, axis=axes, keepdims=True)
    count = np.where(count == 0, 1.0, count)  # Sr[Sr == 0] = 1
    mu = np.sum(region, axis=axes, keepdims=True) / count
    filled = region + (1 - m) * mu
    norm = reference.get("batch_norm" if statistics == "batch" else "instance_norm")
    hp = {"training": True, "track_running_stats": False, "eps": eps}
    z = norm.apply({"x": filled}, None, **hp)[0]["y"]
    total = int(np.prod([x.shape[a] for a in axes]))
    return z * np.sqrt(count / total)


@given(shape=shapes, seed=seeds, statistics=st.sampled_from(KNOBS["statistics"]), eps=eps_values)
def test_official_fill_and_rescale_identity(shape, seed, statistics, eps):
    """BN(x in the region, mu_r elsewhere) sqrt(S_r / T) = (x - mu_r) / sqrt(var_r + eps T / S_r) in
    the region and 0 outside: the official construction is eps_scaling = 'inverse_region_fraction'."""
    rng = np.random.default_rng(seed)
    inputs = draw(shape, rng=rng, params=())
    x, mask = inputs["x"], inputs["mask"]
    axes = group_axes(len(shape), statistics)
    total = int(np.prod([shape[a] for a in axes]))
    if total == 1:
        return  # BatchNorm / InstanceNorm refuse one value per channel
    official = official_rn(x, mask, eps, statistics) + official_rn(x, ~mask, eps, statistics)
    y = apply(inputs, eps=eps, statistics=statistics, eps_scaling="inverse_region_fraction")
    # The filled tensor's variance (S_r/T) var_r + its rounding: a few u of |x_hat| on each side.
    np.testing.assert_allclose(y, official, rtol=0, atol=4 * forward_tolerance(total) * max(1.0, np.max(np.abs(y))))


@given(shape=shapes, seed=seeds, hp=knobs, log_c=st.floats(-2, 2))
def test_invariant_to_shift_per_region(shape, seed, hp, log_c):
    """Adding a constant per (group, region) moves only the region's mean: y is unchanged up to the
    rounding of x + c (u |x + c| / std_r)."""
    rng = np.random.default_rng(seed)
    inputs = draw(shape, rng=rng)
    fg = np.broadcast_to(inputs["mask"], shape)
    axes = group_axes(len(shape), hp["statistics"])
    keep = tuple(1 if a in axes else s for a, s in enumerate(shape))
    c_fg, c_bg = (10.0**log_c * rng.standard_normal(keep) for _ in range(2))
    shifted = dict(inputs, x=inputs["x"] + np.where(fg, c_fg, c_bg))
    y, y2 = apply(inputs, **hp), apply(shifted, **hp)
    n = int(np.prod([shape[a] for a in axes]))
    # x + c rounds by u |x + c|, and the shifted region's centering is accurate to (n + 4) u of
    # |x + c| + |mu_r + c| (the ``centering`` scale), against the forward bound on the other side.
    dy = np.ones(shape)  # unused by the centering scale
    centering = scales(shifted, dy, hp)["centering"] + scales(inputs, dy, hp)["centering"]
    weight = max(np.max(np.abs(inputs["foreground_weight"])), np.max(np.abs(inputs["background_weight"])))
    # |x_hat| <= sqrt(n - 1) in a region of at most n values: the forward bound on both sides.
    bound = (n + 8) * U * centering + 2 * forward_tolerance(n) * weight * np.sqrt(n)
    np.testing.assert_allclose(y2, y, rtol=0, atol=bound + 2 * U * np.max(np.abs(y)))


@given(shape=shapes, seed=seeds, hp=knobs)
def test_grad_sums_zero_per_region(shape, seed, hp):
    """dx = inv_std (h - mean_r h - x_hat mean_r(h x_hat)) sums to zero over each region of each group."""
    rng = np.random.default_rng(seed)
    inputs = draw(shape, rng=rng)
    dy = rng.standard_normal(shape)
    dx = vjp(inputs, dy, **hp)["x"]
    fg = np.broadcast_to(inputs["mask"], shape)
    axes = group_axes(len(shape), hp["statistics"])
    term = scales(inputs, dy, hp)["x"]  # bounds every dx_i's three terms
    for inside in (fg, ~fg):
        total, count = _per_group(dx, inside, axes)
        magnitude, _ = _per_group(np.abs(dx), inside, axes)
        # Each dx_i errs by (n + 6) u of its terms (the region means included), the sum adds n u |dx|.
        n = np.max(count)
        assert np.all(np.abs(total) <= (n + 8) * U * (count * term + magnitude))


def test_dialect_values():
    official, paper = OP.dialect("official"), OP.dialect("paper")
    assert (official["statistics"], official["eps_scaling"], official["bias_placement"]) == (
        "batch", "inverse_region_fraction", "summed")
    assert (paper["statistics"], paper["eps_scaling"], paper["bias_placement"]) == (
        "sample", "none", "per_region")
    assert {k: OP.spec.hparams[k].default for k in KNOBS} == {k: paper[k] for k in KNOBS}
    assert OP.spec.hparams["eps"].default == 1e-5


def test_human_api_takes_the_mask_as_bool_only():
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((2, 3, 4))
    mask = rng.random((2, 1, 4)) < 0.5
    np.testing.assert_array_equal(region_norm(x, mask), apply({"x": x, "mask": mask}))
    with pytest.raises(TypeError, match="region_norm: mask must be a boolean array, got float64"):
        region_norm(x, mask.astype(float))


# --- the official code in torch (float64) -------------------------------------------------------


def _torch_rn(torch, region, mask, eps=1e-5):
    """rn.py RN_binarylabel.rn, restated: sums over dim=[0, 2, 3], Sr[Sr == 0] = 1, BatchNorm2d
    (affine=False, track_running_stats=False) of the mean-filled region, times sqrt(Sr / (B*H*W))."""
    b, _, h, w = region.shape
    sums = torch.sum(region, dim=[0, 2, 3])
    count = torch.sum(mask, dim=[0, 2, 3]).clone()
    count[count == 0] = 1
    mu = sums / count
    z = torch.nn.functional.batch_norm(region + (1 - mask) * mu[None, :, None, None], None, None,
                                       training=True, eps=eps)
    return z * torch.sqrt(count / (b * h * w))[None, :, None, None]


def _torch_rn_binarylabel(torch, x, label):
    return _torch_rn(torch, x * label, label) + _torch_rn(torch, x * (1 - label), 1 - label)


def _torch_rn_b(torch, x, mask, fg_gamma, fg_beta, bg_gamma, bg_beta):
    """rn.py RN_B.forward (mask already at the feature size: F.interpolate is the identity there)."""
    rn_x = _torch_rn_binarylabel(torch, x, mask)
    def channel(v):
        return v[None, :, None, None]

    fg = (rn_x * mask) * (1 + channel(fg_gamma)) + channel(fg_beta)
    bg = (rn_x * (1 - mask)) * (1 + channel(bg_gamma)) + channel(bg_beta)
    return fg + bg


@pytest.mark.parametrize(("shape", "mask_shape", "p"), [
    ((4, 3, 6, 6), (4, 1, 6, 6), 0.3), ((2, 3, 5, 5), (2, 3, 5, 5), 0.5), ((2, 2, 3, 3), (2, 1, 3, 3), 0.1)])
def test_matches_the_official_rn_b_in_torch_autograd(shape, mask_shape, p):
    """The official RN_B (official dialect, weight = 1 + gamma) in float64 torch autograd.  Measured
    over 40 seeds of these shapes: gradients within 2.3 (n + 8) u of their terms (``scales``);
    forward within 0.23 of the test's bound, 4.3e-14 relative to max |y| at worst, where a region
    holds one pixel: the oracle's x_hat is 0 there and the official BatchNorm of the constant filled
    tensor gives its rounding noise divided by sqrt(eps T / S_r) (elsewhere 2e-16 to 5e-16)."""
    torch = torch_or_skip()
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal(shape)
    mask = rng.random(mask_shape) < p
    gammas = [0.3 * rng.standard_normal(shape[1]) for _ in range(4)]
    tx, tp = t64(x, True), [t64(g, True) for g in gammas]
    ty = _torch_rn_b(torch, tx, t64(mask.astype(float)), *tp)
    inputs = {"x": x, "mask": mask, "foreground_weight": 1 + gammas[0], "foreground_bias": gammas[1],
              "background_weight": 1 + gammas[2], "background_bias": gammas[3]}
    hp = OP.dialect("official")
    y = apply(inputs, **hp)
    n = shape[0] * shape[2] * shape[3]
    dy = rng.standard_normal(shape)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=0,
                               atol=8 * (n + 8) * U * scales(inputs, dy, hp)["centering"])
    expected = torch.autograd.grad(ty, [tx, *tp], t64(dy))
    expected = {name: e.numpy() for name, e in zip(("x", *PARAMS), expected, strict=True)}
    assert_grads_close(vjp(inputs, dy, **hp), expected, inputs, dy, hp)


def test_official_rn_l_is_region_norm_with_its_mask_and_spatial_affine():
    """rn.py RN_L restated in torch: sa = sigmoid(conv7x7([mean_C x, max_C x])), mask = sa.detach()
    >= threshold expanded to every channel, rn as RN_binarylabel, then rn_x (1 + gamma_conv(sa)) +
    beta_conv(sa).  The same as the oracle's region_norm (official dialect, no region affine) on that
    mask followed by the spatial affine: forward, and the gradient as the oracle's VJP through the
    normalization plus torch's autograd through the self-aware affine alone.  The threshold is put
    at a quantile of the map (the official 0.8 leaves random weights' map below it)."""
    torch = torch_or_skip()
    f = torch.nn.functional
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((2, 4, 9, 9))
    w_sa, w_g, w_b = (t64(0.2 * rng.standard_normal(s)) for s in ((1, 2, 7, 7), (1, 1, 7, 7), (1, 1, 7, 7)))
    b_g, b_b = t64(0.1 * rng.standard_normal(1)), t64(0.1 * rng.standard_normal(1))
    tx = t64(x, True)

    def self_aware(t):  # SelfAware_Affine.forward
        pooled = torch.cat([torch.mean(t, dim=1, keepdim=True), torch.max(t, dim=1, keepdim=True)[0]], dim=1)
        sa = torch.sigmoid(f.conv2d(pooled, w_sa, padding=3))
        return sa, f.conv2d(sa, w_g, b_g, padding=3), f.conv2d(sa, w_b, b_b, padding=3)

    sa, gamma, beta = self_aware(tx)
    threshold = float(np.quantile(sa.detach().numpy(), 0.6))
    label = (sa.detach() >= threshold).to(torch.float64).expand(tx.size())
    official = _torch_rn_binarylabel(torch, tx, label) * (1 + gamma) + beta

    mask = (sa.detach().numpy() >= threshold)
    assert 0 < mask.mean() < 1
    hp = OP.dialect("official")
    core = apply({"x": x, "mask": mask}, **hp)
    composed = torch.from_numpy(core) * (1 + gamma) + beta
    dy = rng.standard_normal(x.shape)
    n = x.size // x.shape[1]
    size = scales({"x": x, "mask": mask}, dy, hp)
    np.testing.assert_allclose(composed.detach().numpy(), official.detach().numpy(), rtol=0,
                               atol=8 * (n + 8) * U * size["centering"] * float((1 + gamma).detach().abs().max()))
    expected = torch.autograd.grad(official, tx, t64(dy), retain_graph=True)[0].numpy()
    through_norm = vjp({"x": x, "mask": mask}, dy * (1 + gamma.detach().numpy()), **hp)["x"]
    through_affine = torch.autograd.grad(composed, tx, t64(dy))[0].numpy()  # core is a constant there
    # torch's part (the pooling, convolutions and sigmoid) is shared: the difference is the oracle's
    # VJP against torch's BatchNorm of the filled regions, and the forward difference of the
    # normalized core carried through the affine's own derivative.
    core_scale = scales({"x": x, "mask": mask}, dy * (1 + gamma.detach().numpy()), hp)["x"]
    np.testing.assert_allclose(through_norm + through_affine, expected, rtol=0,
                               atol=8 * (n + 8) * U * core_scale)


# --- the harness flags plausible mistakes -------------------------------------------------------


class _KeepMask:
    """The mutants' plumbing upcasts every narrow array; the bool mask must stay a mask."""

    def _compute(self, value):
        value = np.asarray(value)
        return value if value.dtype == bool else super()._compute(value)


class _RN(_KeepMask, Mutant):
    op = "region_norm"
    dialect = {k: OP.dialect("paper")[k] for k in KNOBS}


class _RNControl(_KeepMask, Control):
    """No mistake: the oracle's formulas in the request dtype, the mask kept boolean."""


class RNMeanOverEveryPosition(_RN):
    """The masked sums divided by the positions of the whole group instead of the region's count
    (``sum(x * mask) / (H * W)``): each region's mean and variance shrink toward zero by S_r / T."""

    def forward(self, a, hp):
        x, mask = a["x"], a["mask"]
        axes = group_axes(x.ndim, hp["statistics"])
        total = int(np.prod([x.shape[i] for i in axes]))
        fg = np.broadcast_to(mask, x.shape)
        x_hat = np.zeros_like(x)
        for inside in (fg, ~fg):
            mu = np.sum(np.where(inside, x, 0), axis=axes, keepdims=True) / total  # the mistake
            var = np.sum(np.where(inside, (x - mu) ** 2, 0), axis=axes, keepdims=True) / total
            x_hat = np.where(inside, (x - mu) / np.sqrt(var + hp["eps"]), x_hat)
        gamma, beta = _region_affine(a, fg)
        return {"y": x_hat * gamma + beta}, {}


class RNOfficialEpsUnderThePapersName(_RN):
    """The official fill-and-rescale construction (eps T / S_r) shipped as the paper's RN."""

    expect = ("CONVENTION", "eps_scaling=inverse_region_fraction")

    def forward(self, a, hp):
        return self.oracle(a, hp, eps_scaling="inverse_region_fraction")

    def backward(self, ct, a, hp):
        return self.oracle_vjp(ct, a, hp, eps_scaling="inverse_region_fraction")


class RNGradThroughTheOtherRegionsStatistics(_RN):
    """A backward that subtracts the means of h and h x_hat over the whole group (BatchNorm's /
    InstanceNorm's VJP reused) instead of over each region."""

    def backward(self, ct, a, hp):
        grads = self.oracle_vjp(ct, a, hp)
        x, mask, dy = a["x"], a["mask"], ct["y"]
        axes = group_axes(x.ndim, hp["statistics"])
        fg = np.broadcast_to(mask, x.shape)
        h = dy * _region_affine(a, fg)[0]
        y_hat = self.oracle({k: v for k, v in a.items() if "bias" not in k and "weight" not in k}, hp)[0]["y"]
        dx = np.zeros_like(x)
        for inside in (fg, ~fg):
            count = np.maximum(np.sum(np.broadcast_to(inside, x.shape), axis=axes, keepdims=True), 1)
            mu = np.sum(np.where(inside, x, 0), axis=axes, keepdims=True) / count
            var = np.sum(np.where(inside, (x - mu) ** 2, 0), axis=axes, keepdims=True) / count
            inv_std = 1 / np.sqrt(var + hp["eps"])
            whole = inv_std * (h - h.mean(axis=axes, keepdims=True)
                               - y_hat * (h * y_hat).mean(axis=axes, keepdims=True))  # the mistake
            dx = np.where(inside, whole, dx)
        grads["x"] = dx
        return grads


@pytest.mark.parametrize("cls", [RNMeanOverEveryPosition, RNGradThroughTheOtherRegionsStatistics],
                         ids=lambda c: c.__name__)
def test_mutants_are_flagged(cls):
    flagged, results = flagged_cases(cls())
    assert flagged >= MIN_FLAGGED, f"{cls.__name__} flagged by {flagged} cases:\n{verdict_table(results)}"


def test_the_official_eps_under_the_papers_name_is_a_convention():
    mutant = RNOfficialEpsUnderThePapersName()
    _, results = run_mutant(mutant)
    named = [r for r in results if r.verdict == "CONVENTION"]
    assert sum("eps_scaling" in (r.diagnosis or "") for r in named) >= MIN_FLAGGED, verdict_table(results)
    assert all("eps_scaling='inverse_region_fraction'" in (r.diagnosis or "") for r in named), verdict_table(named)
    assert not [r for r in results if r.verdict in ("FAIL", "ERROR")], verdict_table(results)


def test_the_unmutated_control_is_not_flagged():
    """The mutants' plumbing without a mistake: no FAIL, ERROR or CONVENTION."""
    _, results = run_mutant(_RNControl(_RN.op, _RN.dialect, _RN.dtypes))
    flagged = [r for r in results if r.verdict in ("FAIL", "ERROR", "CONVENTION")]
    assert not flagged, verdict_table(flagged)
