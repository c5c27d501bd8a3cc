"""Split (auxiliary) BatchNorm: forward vs mpmath on adversarial data, the spec's properties, torch
BatchNorm modules per part (timm's SplitBatchNorm2d construction, and timm's own class when its
source is installed), the AdvProp reproductions' MixBatchNorm2d on an odd batch, and two harness
mutants (running statistics shared by every BN; no split at all)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
from mutants import TORCH_BN, Control, Mutant
from reference.normalizers.split_batch_norm import split_bounds

OP = reference.get("split_batch_norm")
BN = reference.get("batch_norm")
RNG = np.random.default_rng(20260612)
BN_KEYS = ("training", "track_running_stats", "axis", "eps", "momentum", "momentum_convention",
           "running_var_correction", "single_value")


def parts(n, k, uneven):
    """The parts as index lists, restated from the two sources: timm input.split(n // k) after its
    divisibility assert; MixBatchNorm2d input[:n // 2], input[n // 2:] (k = 2), generalized."""
    size = n // k
    return [list(range(i * size, (i + 1) * size if i < k - 1 else n)) for i in range(k)]


def bn_hp(hp):
    return {key: hp[key] for key in BN_KEYS if key in hp}


def _state(rng, k, c, count=3.0):
    return {"running_mean": rng.standard_normal((k, c)), "running_var": rng.uniform(0.5, 2.0, (k, c)),
            "num_batches_tracked": np.float64(count)}


def _row_state(state, i):
    return {"running_mean": state["running_mean"][i], "running_var": state["running_var"][i],
            "num_batches_tracked": state["num_batches_tracked"]}


def mp_split_batch_norm(x, weight, bias, eps, idx):
    """Alg. 1 of BatchNorm on each part with its own gamma, beta, at 50 digits (channel axis 1)."""
    R = tuple(a for a in range(x.ndim) if a != 1)
    X = mp_array(x)
    Y = np.empty_like(X)
    shape = [1] * x.ndim
    shape[1] = -1
    for i, g in enumerate(idx):
        w, b = mp_array(weight[i]).reshape(shape), mp_array(bias[i]).reshape(shape)
        Xg = X[g]
        Y[g] = (Xg - mp_mean(Xg, R)) / mp_sqrt(mp_var(Xg, R) + mp_array(np.float64(eps))) * w + b
    return Y


# --- forward accuracy -------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n", "uneven"), [(2, 8, "raise"), (3, 8, "last_larger")])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_train_forward_matches_mpmath_on_adversarial_data(family, k, n, uneven):
    x = adversarial(family, (n, 3, 5))
    weight, bias = 1 + 0.5 * RNG.standard_normal((k, 3)), RNG.standard_normal((k, 3))
    eps = 1e-310 if family == "tiny_1e-150" else 1e-5  # eps below the tiny family's variance
    out, _ = OP.apply({"x": x, "weight": weight, "bias": bias}, None, eps=max(eps, 1e-300), num_splits=k,
                      uneven=uneven)
    err = relative_error(out["y"], mp_split_batch_norm(x, weight, bias, max(eps, 1e-300), parts(n, k, uneven)))
    assert err <= 1e-10, f"{family}: relative error {err:.3g}"


# --- properties -------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
momenta = st.sampled_from([0.1, 0.7, None])


def _per_split_reference(x, w, b, state, dy, k, uneven, hp):
    """batch_norm called on each part with its own row: (y, state, grads)."""
    ys, rows, dxs, dws, dbs = [], [], [], [], []
    for i, g in enumerate(parts(x.shape[0], k, uneven)):
        inputs = {"x": x[g], "weight": w[i], "bias": b[i]}
        out, s = BN.apply(inputs, _row_state(state, i), **bn_hp(hp))
        gr = BN.vjp(inputs, _row_state(state, i), {"y": dy[g]}, **bn_hp(hp))
        ys.append(out["y"])
        rows.append(s)
        dxs.append(gr["x"])
        dws.append(gr["weight"])
        dbs.append(gr["bias"])
    new_state = {"running_mean": np.stack([s["running_mean"] for s in rows]),
                 "running_var": np.stack([s["running_var"] for s in rows]),
                 "num_batches_tracked": rows[0]["num_batches_tracked"]}
    return np.concatenate(ys), new_state, {"x": np.concatenate(dxs), "weight": np.stack(dws), "bias": np.stack(dbs)}


@given(shape=shapes, seed=st.integers(0, 2**32 - 1), k=st.integers(1, 4), extra=st.integers(0, 3),
       uneven=st.sampled_from(["raise", "last_larger"]), momentum=momenta,
       convention=st.sampled_from(["new_weight", "old_weight"]))
def test_equals_batch_norm_per_split(shape, seed, k, extra, uneven, momentum, convention):
    """y = concat_i batch_norm(x_i; row i); each state row is batch_norm's update from its part;
    dx, dgamma_i, dbeta_i are the parts' batch_norm VJPs."""
    rng = np.random.default_rng(seed)
    n = k * (shape[0] + 1) + (extra if uneven == "last_larger" else 0)
    shape = (n, *shape[1:])
    x, dy = rng.standard_normal(shape) * 2 + 1, rng.standard_normal(shape)
    w, b = rng.standard_normal((k, shape[1])), rng.standard_normal((k, shape[1]))
    state = _state(rng, k, shape[1])
    if any(len(g) * shape[2] == 1 for g in parts(n, k, uneven)):
        return  # torch refuses one value per channel
    hp = {"num_splits": k, "uneven": uneven, "momentum": momentum, "momentum_convention": convention}
    inputs = {"x": x, "weight": w, "bias": b}
    out, new_state = OP.apply(inputs, state, **hp)
    grads = OP.vjp(inputs, state, {"y": dy}, **hp)
    y, ref_state, ref_grads = _per_split_reference(x, w, b, state, dy, k, uneven,
                                                   OP.spec.resolve(hp))
    np.testing.assert_array_equal(out["y"], y)
    for key in ref_state:
        np.testing.assert_array_equal(new_state[key], ref_state[key], err_msg=key)
    for key in ref_grads:
        np.testing.assert_array_equal(grads[key], ref_grads[key], err_msg=key)


@given(shape=shapes, seed=st.integers(0, 2**32 - 1), momentum=momenta, training=st.booleans())
def test_equals_batch_norm_with_one_split(shape, seed, momentum, training):
    """num_splits = 1 (which timm refuses) is plain batch_norm, state and VJP included."""
    rng = np.random.default_rng(seed)
    shape = (shape[0] + 1, *shape[1:])
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    w, b = rng.standard_normal((1, shape[1])), rng.standard_normal((1, shape[1]))
    state = _state(rng, 1, shape[1])
    hp = {"num_splits": 1, "momentum": momentum, "training": training}
    out, new_state = OP.apply({"x": x, "weight": w, "bias": b}, state, **hp)
    bn_inputs = {"x": x, "weight": w[0], "bias": b[0]}
    ref, ref_state = BN.apply(bn_inputs, _row_state(state, 0), momentum=momentum, training=training)
    np.testing.assert_array_equal(out["y"], ref["y"])
    for key in ref_state:
        np.testing.assert_array_equal(np.reshape(new_state[key], np.shape(ref_state[key])), ref_state[key])
    g = OP.vjp({"x": x, "weight": w, "bias": b}, state, {"y": dy}, **hp)
    ref_g = BN.vjp(bn_inputs, _row_state(state, 0), {"y": dy}, momentum=momentum, training=training)
    np.testing.assert_array_equal(g["x"], ref_g["x"])
    np.testing.assert_array_equal(g["weight"][0], ref_g["weight"])


@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 4), n=st.integers(1, 9), tracked=st.booleans())
def test_eval_is_the_main_batch_norm(seed, k, n, tracked):
    """Inference: batch_norm eval with row 0 on the whole batch (any N, divisible or not; the batch's
    statistics when untracked); the state is unchanged and rows 1.. get zero gradients."""
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal((n, 3, 2)), rng.standard_normal((n, 3, 2))
    w, b = rng.standard_normal((k, 3)), rng.standard_normal((k, 3))
    state = _state(rng, k, 3) if tracked else None
    hp = {"num_splits": k, "training": False, "track_running_stats": tracked}
    out, new_state = OP.apply({"x": x, "weight": w, "bias": b}, state, **hp)
    row = _row_state(state, 0) if tracked else None
    bn_hp_ = {"training": False, "track_running_stats": tracked}
    ref, _ = BN.apply({"x": x, "weight": w[0], "bias": b[0]}, row, **bn_hp_)
    np.testing.assert_array_equal(out["y"], ref["y"])
    if tracked:
        for key in state:
            np.testing.assert_array_equal(new_state[key], state[key])
    else:
        assert new_state == {}
    g = OP.vjp({"x": x, "weight": w, "bias": b}, state, {"y": dy}, **hp)
    ref_g = BN.vjp({"x": x, "weight": w[0], "bias": b[0]}, row, {"y": dy}, **bn_hp_)
    np.testing.assert_array_equal(g["x"], ref_g["x"])
    np.testing.assert_array_equal(g["weight"][0], ref_g["weight"])
    assert np.all(g["weight"][1:] == 0) and np.all(g["bias"][1:] == 0)


@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 4), j=st.integers(0, 3))
def test_aux_rows_see_only_their_part(seed, k, j):
    """Changing the samples of part j moves y on part j, running-stat row j and the gradient rows j
    only: the BNs do not share statistics (the point of AdvProp's auxiliary BN)."""
    j = j % k
    rng = np.random.default_rng(seed)
    n = 3 * k
    x, dy = rng.standard_normal((n, 2, 2)), rng.standard_normal((n, 2, 2))
    w, b = rng.standard_normal((k, 2)), rng.standard_normal((k, 2))
    state = _state(rng, k, 2)
    hp = {"num_splits": k}
    x2 = x.copy()
    x2[3 * j: 3 * j + 3] = x2[3 * j: 3 * j + 3] * 3 + 5
    (y1, s1), (y2, s2) = (OP.apply({"x": v, "weight": w, "bias": b}, state, **hp) for v in (x, x2))
    g1, g2 = (OP.vjp({"x": v, "weight": w, "bias": b}, state, {"y": dy}, **hp) for v in (x, x2))
    others = [i for i in range(k) if i != j]
    rows = [r for i in others for r in range(3 * i, 3 * i + 3)]
    np.testing.assert_array_equal(y1["y"][rows], y2["y"][rows])
    np.testing.assert_array_equal(s1["running_mean"][others], s2["running_mean"][others])
    np.testing.assert_array_equal(s1["running_var"][others], s2["running_var"][others])
    np.testing.assert_array_equal(g1["weight"][others], g2["weight"][others])
    assert np.max(np.abs(s1["running_mean"][j] - s2["running_mean"][j])) > 0.1


@given(n=st.integers(1, 40), k=st.integers(1, 6))
def test_split_sizes_follow_uneven_rule(n, k):
    """raise: torch.split(N // k) after timm's divisibility assert; last_larger: N // k each, the last
    part the rest (MixBatchNorm2d's input[:N//2], input[N//2:] at k = 2)."""
    torch = torch_or_skip()
    t = torch.arange(n)
    if n % k == 0:
        assert [list(range(a, c)) for a, c in split_bounds(n, k, "raise")] == \
            [p.tolist() for p in t.split(n // k)]
    else:
        with pytest.raises(ValueError, match="must be a multiple of num_splits"):
            split_bounds(n, k, "raise")
    if n < k:
        with pytest.raises(ValueError, match="leave the first parts empty"):
            split_bounds(n, k, "last_larger")
        return
    bounds = split_bounds(n, k, "last_larger")
    assert [list(range(a, c)) for a, c in bounds] == parts(n, k, "last_larger")
    if k == 2:
        assert [list(range(a, c)) for a, c in bounds] == [t[: n // 2].tolist(), t[n // 2:].tolist()]


@given(shape=shapes, seed=st.integers(0, 2**32 - 1), k=st.integers(1, 3),
       uneven=st.sampled_from(["raise", "last_larger"]))
def test_grad_sums_zero_per_split(shape, seed, k, uneven):
    """Each part's mean is subtracted: sum over each part (and the other axes) of dx = 0 per channel."""
    rng = np.random.default_rng(seed)
    n = k * (shape[0] + 1) + (1 if uneven == "last_larger" else 0)
    x, dy = rng.standard_normal((n, *shape[1:])), rng.standard_normal((n, *shape[1:]))
    idx = parts(n, k, uneven)
    if any(len(g) * shape[2] == 1 for g in idx):
        return
    w = np.full((k, shape[1]), 1.7)
    dx = OP.vjp({"x": x, "weight": w}, None, {"y": dy}, num_splits=k, uneven=uneven)["x"]
    for g in idx:
        scale = np.abs(dy[g]).sum() * 1.7 / np.sqrt(x[g].var(axis=(0, 2)).min() + 1e-5)
        np.testing.assert_allclose(dx[g].sum(axis=(0, 2)), 0, atol=1e-13 * scale)


# --- torch: BatchNorm modules per part, timm's class, MixBatchNorm2d ----------------------------


def _bn_module(torch, c, hp, w, b, ndim):
    cls = torch.nn.BatchNorm2d if ndim == 4 else torch.nn.BatchNorm1d
    bn = cls(c, eps=hp["eps"], momentum=hp["momentum"], dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(t64(w))
        bn.bias.copy_(t64(b))
    return bn


def relative_error_np(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _run_against(torch, modules, forward, hp, shape, steps=4):
    """Train, train, eval, train: outputs, autograd gradients of every BN's gamma and beta, running
    statistics and counters against the oracle; returns the worst relative errors."""
    k = hp["num_splits"]
    w = np.stack([m.weight.detach().numpy() for m in modules])
    b = np.stack([m.bias.detach().numpy() for m in modules])
    state, worst = None, {"y": 0.0, "grads": 0.0, "state": 0.0}
    for step in range(steps):
        training = step != 2
        for m in modules:
            m.train(training)
        x, dy = RNG.standard_normal(shape) * (step + 1) + step, RNG.standard_normal(shape)
        tx = t64(x, True)
        ty = forward(tx)
        step_hp = {**hp, "training": training}
        inputs = {"x": x, "weight": w, "bias": b}
        grads = OP.vjp(inputs, state, {"y": dy}, **step_hp)
        out, state = OP.apply(inputs, state, **step_hp)
        np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-12, atol=1e-13)
        worst["y"] = max(worst["y"], relative_error_np(out["y"], ty.detach().numpy()))
        leaves = {"x": tx, **{f"w{i}": m.weight for i, m in enumerate(modules)},
                  **{f"b{i}": m.bias for i, m in enumerate(modules)}}
        # In eval the aux modules are not in the graph: their gradients are zero.
        found = torch.autograd.grad(ty, list(leaves.values()), t64(dy), allow_unused=True)
        expected = {key: np.zeros(tuple(v.shape)) if g is None else g.numpy()
                    for (key, v), g in zip(leaves.items(), found, strict=True)}
        expected_w = np.stack([expected[f"w{i}"] for i in range(k)])
        expected_b = np.stack([expected[f"b{i}"] for i in range(k)])
        for got, want in ((grads["x"], expected["x"]), (grads["weight"], expected_w), (grads["bias"], expected_b)):
            np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
            worst["grads"] = max(worst["grads"], relative_error_np(got, want))
        for key in ("running_mean", "running_var"):
            want = np.stack([getattr(m, key).numpy() for m in modules])
            np.testing.assert_allclose(state[key], want, rtol=1e-13, atol=1e-15)
            worst["state"] = max(worst["state"], relative_error_np(state[key], want))
        assert all(int(m.num_batches_tracked) == int(state["num_batches_tracked"]) for m in modules)
    return worst


@pytest.mark.parametrize(("shape", "k"), [((8, 3, 2, 2), 2), ((9, 4, 3), 3), ((6, 5), 2)])
def test_matches_torch_batchnorm_modules_per_part(shape, k):
    """timm's construction restated: the main BatchNorm module on input.split(N // k)[0], aux module
    i on part i, torch.cat; eval runs the main module on the whole batch.  Measured worst relative
    errors over 5 draws of each shape: y 3.5e-16, gradients 7.8e-16, running statistics 3.9e-16."""
    torch = torch_or_skip()
    hp = {**OP.dialect("timm"), "num_splits": k}
    modules = [_bn_module(torch, shape[1], hp, 1 + 0.3 * RNG.standard_normal(shape[1]),
                          RNG.standard_normal(shape[1]), len(shape)) for _ in range(k)]

    def forward(tx):
        if not modules[0].training:
            return modules[0](tx)
        chunks = tx.split(tx.shape[0] // k)
        return torch.cat([m(c) for m, c in zip(modules, chunks, strict=True)])

    _run_against(torch, modules, forward, hp, shape)


def _timm_split_batchnorm():
    """timm/layers/split_batchnorm.py loaded by path (it imports only torch), so a timm installed
    without torchvision (which the CPU torch pin has no matching build of) still serves."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "layers" / "split_batchnorm.py"
    module_spec = importlib.util.spec_from_file_location("_timm_split_batchnorm", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("shape", "k"), [((8, 3, 2, 2), 2), ((9, 2, 3, 3), 3)])
def test_matches_timm_split_batchnorm2d(shape, k):
    """timm's SplitBatchNorm2d itself (made float64 with .double(): its constructor gives the main BN
    float32 even with dtype=torch.float64), random affine rows, over train/eval steps.  Measured
    with timm 1.0.31 (5 draws of each shape): y 4.1e-16, gradients 1.3e-15, running statistics
    4.0e-16 worst relative."""
    torch = torch_or_skip()
    timm = _timm_split_batchnorm()
    hp = {**OP.dialect("timm"), "num_splits": k}
    layer = timm.SplitBatchNorm2d(shape[1], num_splits=k).double()
    modules = [layer, *layer.aux_bn]
    with torch.no_grad():
        for m in modules:
            m.weight.copy_(t64(1 + 0.3 * RNG.standard_normal(shape[1])))
            m.bias.copy_(t64(RNG.standard_normal(shape[1])))
    _run_against(torch, modules, layer, hp, shape)
    with pytest.raises(AssertionError, match="evenly divisible"):
        layer.train()(t64(RNG.standard_normal((shape[0] + 1, *shape[1:]))))


def test_timm_constructor_leaves_the_main_bn_in_float32():
    """Finding (timm 1.0.31): SplitBatchNorm2d(..., dtype=torch.float64) passes dtype to the aux BNs
    only; the main BN (super().__init__) keeps torch's default float32."""
    torch = torch_or_skip()
    timm = _timm_split_batchnorm()
    layer = timm.SplitBatchNorm2d(3, num_splits=2, dtype=torch.float64)
    if layer.weight.dtype == torch.float64:
        pytest.skip("this timm passes dtype to the main BN")
    assert layer.weight.dtype == torch.float32 and layer.aux_bn[0].weight.dtype == torch.float64


def test_matches_mix_batchnorm_on_an_odd_batch():
    """MixBatchNorm2d in 'mix' mode (AdvProp reproductions): input[:N // 2] through the main BN,
    input[N // 2:] through aux_bn, no divisibility check; 'clean' with the module in eval for
    validation.  N = 7: parts of 3 and 4.  Measured worst relative errors (5 draws): y 2.6e-16,
    gradients 4.5e-16, running statistics 3.2e-16."""
    torch = torch_or_skip()
    shape = (7, 3, 2, 2)
    hp = OP.dialect("mix_batchnorm")
    modules = [_bn_module(torch, 3, hp, 1 + 0.3 * RNG.standard_normal(3), RNG.standard_normal(3), 4)
               for _ in range(2)]

    def forward(tx):
        if not modules[0].training:  # batch_type = 'clean'
            return modules[0](tx)
        n = tx.shape[0]
        return torch.cat([modules[0](tx[: n // 2]), modules[1](tx[n // 2:])])

    _run_against(torch, modules, forward, hp, shape)


# --- the harness flags plausible mistakes -------------------------------------------------------


class _Split(Mutant):
    op = "split_batch_norm"
    dialect = TORCH_BN  # the cut (uneven) comes from each case
    dtypes = ("float64",)  # where the mistakes show whatever the rounding; half the harness time


class SplitBNSharedRunningStats(_Split):
    """The aux BNs share the main BN's running buffers (``aux.running_mean = module.running_mean``
    without timm's ``.clone()`` in a model conversion): every part updates the same statistics in
    turn, and every row ends up holding that one sequence of updates."""

    def forward(self, a, hp):
        out, state = self.oracle(a, hp)
        if hp["training"] and hp["track_running_stats"]:
            k = hp["num_splits"]
            rm, rv = a["running_mean"][0], a["running_var"][0]
            count = a["num_batches_tracked"]
            for lo, hi in split_bounds(a["x"].shape[0], k, hp["uneven"]):
                one = {"x": a["x"][lo:hi], "running_mean": rm, "running_var": rv, "num_batches_tracked": count}
                _, s = _raw_bn(one, hp)
                # the mistake: one set of buffers (counter included) updated by every part in turn
                rm, rv, count = s["running_mean"], s["running_var"], s["num_batches_tracked"]
            state = {"running_mean": np.stack([rm] * k), "running_var": np.stack([rv] * k),
                     "num_batches_tracked": count}
        return out, state


def _raw_bn(a, hp):
    raw = getattr(BN.function, "__wrapped__", BN.function)
    hp_bn = {key: hp[key] for key in BN_KEYS}
    return raw(a["x"], None, None, a["running_mean"], a["running_var"], a["num_batches_tracked"], **hp_bn)


class SplitBNNotSplit(_Split):
    """The model was never converted (or the split layer forgets to split): the whole batch goes
    through the main BN in training; the aux BNs are never called (their rows keep their state and
    get no gradient)."""

    def forward(self, a, hp):
        out, s = self.oracle({**a, **_main_rows(a)}, hp, num_splits=1)
        state = dict(s)
        for key in ("running_mean", "running_var"):
            if key in s:
                state[key] = np.concatenate([s[key], a[key][1:]])
        return out, state

    def backward(self, ct, a, hp):
        grads = self.oracle_vjp(ct, {**a, **_main_rows(a)}, hp, num_splits=1)
        for key in ("weight", "bias"):
            if key in grads:
                grads[key] = np.concatenate([grads[key], np.zeros_like(a[key][1:])])
        return grads


def _main_rows(a):
    """The main BN's rows as one-split tensors."""
    return {k: a[k][:1] for k in ("weight", "bias", "running_mean", "running_var") if a.get(k) is not None}


@pytest.mark.parametrize("cls", [SplitBNSharedRunningStats, SplitBNNotSplit], ids=lambda c: c.__name__)
def test_mutants_are_flagged(cls):
    flagged, results = flagged_cases(cls())
    assert flagged >= MIN_FLAGGED, f"{cls.__name__} flagged by {flagged} cases:\n{verdict_table(results)}"


def test_the_unmutated_control_is_not_flagged():
    """The mutants' plumbing without a mistake: no FAIL, ERROR or CONVENTION."""
    _, results = run_mutant(Control(_Split.op, _Split.dialect, _Split.dtypes))
    flagged = [r for r in results if r.verdict in ("FAIL", "ERROR", "CONVENTION")]
    assert not flagged, verdict_table(flagged)
