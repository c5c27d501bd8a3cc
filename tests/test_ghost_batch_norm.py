"""Ghost BatchNorm: forward vs mpmath on adversarial data, running statistics per dialect, the spec's
properties, torch (BN modules called per chunk, cifar10-fast's view trick) and the tf.keras reshape
form restated in torch autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from conformance.cases import ADVERSARIAL, adversarial
from helpers import (
    mp_array,
    mp_mean,
    mp_sqrt,
    mp_var,
    relative_error,
    t64,
    torch_or_skip,
    torch_vjp,
)
from reference.normalizers.ghost_batch_norm import ghost_layout

OP = reference.get("ghost_batch_norm")
BN = reference.get("batch_norm")
RNG = np.random.default_rng(20260517)
CONTIGUOUS = ["chunk_floor", "chunk_ceil", "fixed"]


def groups(n, vbs, split):
    """The ghost batches as lists of sample indices, restated from the frameworks' rules."""
    if split == "strided":
        k = n // vbs
        return [list(range(j, n, k)) for j in range(k)]
    if split == "fixed":
        size = vbs
    else:
        k = n // vbs if split == "chunk_floor" else math.ceil(n / vbs)
        size = math.ceil(n / k)  # torch.chunk: chunks of ceil(n / k), the last one smaller
    return [list(range(a, min(a + size, n))) for a in range(0, n, size)]


def bn_hparams(hp):
    """The batch_norm hyper-parameters of a ghost_batch_norm call."""
    return {k: v for k, v in hp.items() if k in BN.spec.hparams}


def mp_ghost_batch_norm(x, weight, bias, eps, idx, axis=1):
    """Alg. 1 of BatchNorm per ghost batch at 50 digits, written independently of the oracle."""
    R = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    X = mp_array(x)
    Y = np.empty_like(X)
    shape = [1] * x.ndim
    shape[axis] = -1
    w, b = mp_array(weight).reshape(shape), mp_array(bias).reshape(shape)
    for g in idx:
        Xg = X[g]
        mean, var = mp_mean(Xg, R), mp_var(Xg, R)
        Y[g] = (Xg - mean) / mp_sqrt(var + mp_array(np.float64(eps))) * w + b
    return Y


# --- forward accuracy -------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["chunk_ceil", "strided"])
@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_train_forward_matches_mpmath_on_adversarial_data(family, split):
    x = adversarial(family, (8, 3, 5))
    weight, bias = 1 + 0.5 * RNG.standard_normal(3), RNG.standard_normal(3)
    eps = max(1e-5 if family != "tiny_1e-150" else 1e-310, 1e-300)
    vbs = 3 if split == "chunk_ceil" else 2  # 3, 3, 2 contiguous / 4 strided groups of 2
    out, _ = OP.apply({"x": x, "weight": weight, "bias": bias}, None, eps=eps, virtual_batch_size=vbs,
                      split=split)
    err = relative_error(out["y"], mp_ghost_batch_norm(x, weight, bias, eps, groups(8, vbs, split)))
    assert err <= 1e-10, f"{family}: relative error {err:.3g}"


def test_one_sample_ghost_batches_allowed_give_beta():
    """tf.keras with virtual_batch_size=1: every ghost batch is one sample, var = 0, y = beta."""
    x, b = RNG.standard_normal((3, 4)), RNG.standard_normal(4)
    hp = {**OP.dialect("tf_keras"), "virtual_batch_size": 1}
    out, state = OP.apply({"x": x, "bias": b}, None, **hp)
    np.testing.assert_array_equal(out["y"], np.broadcast_to(b, (3, 4)))
    # averaged update: mean of the three one-sample means; biased variance 0
    np.testing.assert_allclose(state["running_mean"], 0.01 * x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(state["running_var"], 0.99 * np.ones(4), rtol=1e-15)
    assert np.all(OP.vjp({"x": x, "bias": b}, None, {"y": RNG.standard_normal((3, 4))}, **hp)["x"] == 0)


# --- running statistics over several steps ------------------------------------------------------


def _expected_running(batches, hp):
    """Each dialect's running-stat recurrence written out directly (independent of the oracle)."""
    axis = hp["axis"] % batches[0].ndim
    R = tuple(a for a in range(batches[0].ndim) if a != axis)
    C = batches[0].shape[axis]
    mean, var, count = np.zeros(C), np.ones(C), 0
    m, corr = hp["momentum"], hp["running_var_correction"]
    w_new = m if hp["momentum_convention"] == "new_weight" else 1.0 - m
    for x in batches:
        idx = groups(x.shape[0], hp["virtual_batch_size"], hp["split"])
        stats = []
        for g in idx:
            xg = x[g]
            n = xg.size // C
            bm = xg.mean(axis=R)
            bv = ((xg - np.expand_dims(bm, R)) ** 2).sum(axis=R) / max(n - corr, 1)
            stats.append((bm, bv))
        if hp["running_update"] == "averaged":
            bm, bv = np.mean([s[0] for s in stats], axis=0), np.mean([s[1] for s in stats], axis=0)
            mean, var, count = (1 - w_new) * mean + w_new * bm, (1 - w_new) * var + w_new * bv, count + 1
        else:
            w = w_new / len(idx) if hp["chunk_momentum"] == "divided" else w_new
            for bm, bv in stats:
                mean, var, count = (1 - w) * mean + w * bm, (1 - w) * var + w * bv, count + 1
    return mean, var, count


@pytest.mark.parametrize("dialect", ["hoffer", "composer", "tabnet", "tf_keras", "cifar10_fast"])
def test_running_stats_over_steps_with_train_eval_switch(dialect):
    hp = {**OP.dialect(dialect), "virtual_batch_size": 3}
    n = 9 if hp["split"] == "strided" else 10
    shape = (n, 4, 2) if hp["axis"] == 1 else (n, 2, 4)
    batches = [RNG.standard_normal(shape) * (k + 1) + k for k in range(4)]
    state = None
    for k, x in enumerate(batches):
        _, state = OP.apply({"x": x}, state, **hp)
        if k == 1:  # an eval step in the middle must not touch the state
            frozen = {key: np.copy(v) for key, v in state.items()}
            out, state = OP.apply({"x": x}, state, **{**hp, "training": False})
            for key in frozen:
                np.testing.assert_array_equal(state[key], frozen[key])
            rshape = [1, 1, 1]
            rshape[hp["axis"]] = -1
            inv = 1 / np.sqrt(frozen["running_var"].reshape(rshape) + hp["eps"])
            np.testing.assert_allclose(out["y"], (x - frozen["running_mean"].reshape(rshape)) * inv,
                                       rtol=1e-14)
    mean, var, count = _expected_running(batches, hp)
    np.testing.assert_allclose(state["running_mean"], mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(state["running_var"], var, rtol=1e-13)
    assert float(state["num_batches_tracked"]) == count


# --- properties -------------------------------------------------------------------------------

shapes = st.tuples(st.integers(2, 9), st.integers(1, 3), st.integers(1, 3))
momenta = st.sampled_from([0.1, 0.3, 0.9, None])


def _state(rng, c):
    return {"running_mean": rng.standard_normal(c), "running_var": rng.uniform(0.5, 2.0, c),
            "num_batches_tracked": np.float64(3)}


@pytest.mark.checks("equals_batch_norm_with_one_ghost_batch")
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), extra=st.integers(0, 3),
       split=st.sampled_from(["chunk_ceil", "fixed"]), update=st.sampled_from(["sequential", "averaged"]),
       momentum=momenta)
def test_equals_batch_norm_with_one_ghost_batch(shape, seed, extra, split, update, momentum):
    """virtual_batch_size >= N: one ghost batch, so outputs, state and gradients are batch_norm's."""
    rng = np.random.default_rng(seed)
    x, w, b, dy = rng.standard_normal(shape), rng.standard_normal(shape[1]), rng.standard_normal(shape[1]), \
        rng.standard_normal(shape)
    inputs, state = {"x": x, "weight": w, "bias": b}, _state(rng, shape[1])
    hp = {"virtual_batch_size": shape[0] + extra, "split": split, "running_update": update,
          "momentum": momentum, "chunk_momentum": "divided"}
    out, new_state = OP.apply(inputs, state, **hp)
    ref, ref_state = BN.apply(inputs, state, momentum=momentum)
    np.testing.assert_array_equal(out["y"], ref["y"])
    for key in ref_state:
        np.testing.assert_allclose(new_state[key], ref_state[key], rtol=1e-15, atol=0, err_msg=key)
    grads, ref_grads = OP.vjp(inputs, state, {"y": dy}, **hp), BN.vjp(inputs, state, {"y": dy}, momentum=momentum)
    for key in ref_grads:
        np.testing.assert_allclose(grads[key], ref_grads[key], rtol=1e-12, atol=1e-13, err_msg=key)


@pytest.mark.checks("equals_batch_norm_per_ghost_batch")
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), vbs=st.integers(2, 4),
       split=st.sampled_from(CONTIGUOUS), momentum=momenta)
def test_equals_batch_norm_per_ghost_batch(shape, seed, vbs, split, momentum):
    """y = concat_g batch_norm(x_g); the state is batch_norm called once per chunk; dx, dgamma, dbeta
    are the per-chunk batch_norm VJPs, concatenated and summed."""
    rng = np.random.default_rng(seed)
    n = max(shape[0], vbs)
    shape = (n, *shape[1:])
    x, w, b, dy = rng.standard_normal(shape), rng.standard_normal(shape[1]), rng.standard_normal(shape[1]), \
        rng.standard_normal(shape)
    idx = groups(n, vbs, split)
    if any(len(g) * shape[2] == 1 for g in idx):  # torch refuses a one-value ghost batch
        return
    state = _state(rng, shape[1])
    hp = {"virtual_batch_size": vbs, "split": split, "momentum": momentum}
    inputs = {"x": x, "weight": w, "bias": b}
    out, new_state = OP.apply(inputs, state, **hp)
    grads = OP.vjp(inputs, state, {"y": dy}, **hp)
    ys, ref_state, dxs, dw, db = [], state, [], 0.0, 0.0
    for g in idx:
        chunk = {"x": x[g], "weight": w, "bias": b}
        ys.append(BN.apply(chunk, ref_state, momentum=momentum)[0]["y"])
        gg = BN.vjp(chunk, ref_state, {"y": dy[g]}, momentum=momentum)
        ref_state = BN.apply(chunk, ref_state, momentum=momentum)[1]
        dxs.append(gg["x"])
        dw, db = dw + gg["weight"], db + gg["bias"]
    np.testing.assert_allclose(out["y"], np.concatenate(ys), rtol=1e-14, atol=1e-15)
    for key in ref_state:
        np.testing.assert_allclose(new_state[key], ref_state[key], rtol=1e-14, atol=1e-15, err_msg=key)
    np.testing.assert_allclose(grads["x"], np.concatenate(dxs), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads["weight"], dw, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads["bias"], db, rtol=1e-12, atol=1e-12)


def _ghost_stats(x, idx, corr):
    R = (0, 2)
    out = []
    for g in idx:
        xg = x[g]
        n = xg.shape[0] * xg.shape[2]
        bm = xg.mean(axis=R)
        out.append((bm, ((xg - bm[None, :, None]) ** 2).sum(axis=R) / max(n - corr, 1)))
    return out


@pytest.mark.checks("sequential_ema_closed_form")
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 5), vbs=st.integers(2, 4),
       m=st.floats(0.01, 0.99), convention=st.sampled_from(["new_weight", "old_weight"]),
       divided=st.booleans())
def test_sequential_ema_closed_form(seed, k, vbs, m, convention, divided):
    """k sequential updates: r_k = (1-w)^k r_0 + sum_g w (1-w)^(k-g) b_g, w the new batch's weight
    (m, or 1-m for old_weight; the momentum m / k for Composer); averaged: r = (1-w) r_0 + w mean_g b_g.
    On k identical ghost batches the sequential update is the averaged one at w' = 1 - (1-w)^k."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((k * vbs, 2, 3)) * rng.uniform(0.5, 3) + rng.standard_normal()
    state = _state(rng, 2)
    hp = {"virtual_batch_size": vbs, "momentum": m, "momentum_convention": convention,
          "chunk_momentum": "divided" if divided else "same"}
    def new_weight(momentum):  # the weight of the new statistics in one update
        return momentum if convention == "new_weight" else 1 - momentum

    w = new_weight(m)
    stats = _ghost_stats(x, groups(k * vbs, vbs, "chunk_ceil"), 1)
    _, seq = OP.apply({"x": x}, state, **hp)
    ws = new_weight(m / k) if divided else w  # Composer divides the momentum argument by k
    for key, s in (("running_mean", 0), ("running_var", 1)):
        closed = (1 - ws) ** k * state[key] + sum(ws * (1 - ws) ** (k - 1 - g) * stats[g][s] for g in range(k))
        np.testing.assert_allclose(seq[key], closed, rtol=1e-12, atol=1e-14, err_msg=key)
    assert float(seq["num_batches_tracked"]) == 3 + k
    _, avg = OP.apply({"x": x}, state, **{**hp, "running_update": "averaged"})
    for key, s in (("running_mean", 0), ("running_var", 1)):
        mean_b = np.mean([st_[s] for st_ in stats], axis=0)
        np.testing.assert_allclose(avg[key], (1 - w) * state[key] + w * mean_b, rtol=1e-13, atol=1e-14)
    assert float(avg["num_batches_tracked"]) == 4
    # identical ghost batches: the k sequential updates compound into one at 1 - (1 - w)^k
    tiled = np.concatenate([x[:vbs]] * k)
    _, seq = OP.apply({"x": tiled}, state, **{**hp, "chunk_momentum": "same"})
    w_k = 1 - (1 - w) ** k
    m_k = w_k if convention == "new_weight" else 1 - w_k
    _, avg = OP.apply({"x": tiled}, state, **{**hp, "running_update": "averaged", "momentum": m_k})
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(seq[key], avg[key], rtol=1e-12, atol=1e-14, err_msg=key)


def test_averaged_variance_is_the_within_ghost_variance():
    """tf.keras stores mean_g var_g: the whole-batch variance minus the spread of the ghost means
    (law of total variance, equal ghost sizes, biased variances)."""
    x = RNG.standard_normal((12, 3)) + np.repeat(np.arange(4.0), 3)[:, None] * 5
    hp = {**OP.dialect("tf_keras"), "axis": 1, "virtual_batch_size": 3, "split": "chunk_ceil",
          "momentum": 0.0}
    _, state = OP.apply({"x": x}, None, **hp)
    ghost_means = x.reshape(4, 3, 3).mean(axis=1)
    np.testing.assert_allclose(state["running_var"], x.var(axis=0) - ghost_means.var(axis=0), rtol=1e-12)


@pytest.mark.checks("ghost_batch_sizes_follow_split_rule")
@settings(max_examples=200)
@given(n=st.integers(1, 60), vbs=st.integers(1, 20))
def test_ghost_batch_sizes_follow_split_rule(n, vbs):
    """chunk_floor / chunk_ceil are torch.chunk(N // vbs) / torch.chunk(ceil(N / vbs)), fixed is
    torch.split(vbs), strided is the reshape (vbs, N / vbs): ghost j = {i : i mod k = j}."""
    torch = torch_or_skip()
    t = torch.arange(n)
    for split, expect in (
        ("chunk_ceil", lambda: t.chunk(math.ceil(n / vbs))),
        ("chunk_floor", lambda: t.chunk(n // vbs)),
        ("fixed", lambda: t.split(vbs)),
    ):
        if split == "chunk_floor" and n < vbs:
            with pytest.raises(ValueError, match="0 ghost batches"):
                ghost_layout(n, vbs, split)
            continue
        layout = ghost_layout(n, vbs, split)
        assert layout.order is None
        assert [list(range(a, b)) for a, b in layout.bounds] == [c.tolist() for c in expect()], split
    assert ghost_layout(n, vbs, "chunk_ceil").requested == len(t.chunk(math.ceil(n / vbs)))
    if n % vbs == 0:
        layout = ghost_layout(n, vbs, "strided")
        k = n // vbs
        tf_groups = t.reshape(vbs, k).T.tolist()  # tf.keras: [vbs, -1], reduce over the first axis
        assert [[layout.order[i] for i in range(a, b)] for a, b in layout.bounds] == tf_groups
        assert all(i % k == j for j, g in enumerate(tf_groups) for i in g)
    else:
        with pytest.raises(ValueError, match="needs virtual_batch_size"):
            ghost_layout(n, vbs, "strided")


@pytest.mark.checks("strided_is_contiguous_on_permuted_batch")
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 4), vbs=st.integers(2, 4))
def test_strided_is_contiguous_on_permuted_batch(seed, k, vbs):
    """The strided groups are the contiguous chunks of x[perm], perm = [j, j+k, ...] for j < k."""
    rng = np.random.default_rng(seed)
    n = k * vbs
    x, w, b, dy = rng.standard_normal((n, 3, 2)), rng.standard_normal(3), rng.standard_normal(3), \
        rng.standard_normal((n, 3, 2))
    perm = np.array([j + a * k for j in range(k) for a in range(vbs)])
    inv = np.argsort(perm)
    inputs = {"x": x, "weight": w, "bias": b}
    permuted = {"x": x[perm], "weight": w, "bias": b}
    hp = {"virtual_batch_size": vbs, "running_update": "averaged"}
    y, s1 = OP.apply(inputs, None, split="strided", **hp)
    yc, s2 = OP.apply(permuted, None, split="chunk_ceil", **hp)
    np.testing.assert_array_equal(y["y"], yc["y"][inv])
    for key in s1:
        np.testing.assert_array_equal(s1[key], s2[key])
    g1 = OP.vjp(inputs, None, {"y": dy}, split="strided", **hp)
    g2 = OP.vjp(permuted, None, {"y": dy[perm]}, split="chunk_ceil", **hp)
    np.testing.assert_allclose(g1["x"], g2["x"][inv], rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(g1["weight"], g2["weight"], rtol=1e-12, atol=1e-13)


@pytest.mark.checks("permutation_within_ghost_batch_commutes")
@given(seed=st.integers(0, 2**32 - 1), split=st.sampled_from(["chunk_ceil", "strided"]))
def test_permutation_within_ghost_batch_commutes(seed, split):
    """Permuting the samples of one ghost batch permutes y; swapping two samples of different ghost
    batches does not (each ghost batch's statistics change)."""
    rng = np.random.default_rng(seed)
    n, vbs = 8, 4
    x = rng.standard_normal((n, 3))
    hp = {"virtual_batch_size": vbs, "split": split}
    y = OP.apply({"x": x}, None, **hp)[0]["y"]
    idx = groups(n, vbs, split)
    perm = np.arange(n)
    perm[idx[0]] = rng.permutation(idx[0])
    np.testing.assert_allclose(OP.apply({"x": x[perm]}, None, **hp)[0]["y"], y[perm], rtol=1e-13, atol=1e-14)
    swap = np.arange(n)
    i, j = idx[0][0], idx[1][0]
    swap[i], swap[j] = j, i
    across = OP.apply({"x": x[swap]}, None, **hp)[0]["y"]
    assert np.max(np.abs(across - y[swap])) > 1e-6


@pytest.mark.checks("grad_sums_zero_per_ghost_batch")
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), vbs=st.integers(2, 4), split=st.sampled_from(CONTIGUOUS))
def test_grad_sums_zero_per_ghost_batch(shape, seed, vbs, split):
    """Each ghost batch's mean is subtracted: sum over the ghost batch (and R) of dx is 0 per channel."""
    rng = np.random.default_rng(seed)
    n = max(shape[0], vbs)
    shape = (n, *shape[1:])
    idx = groups(n, vbs, split)
    if any(len(g) * shape[2] == 1 for g in idx):
        return
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    dx = OP.vjp({"x": x, "weight": np.full(shape[1], 1.7)}, None, {"y": dy}, virtual_batch_size=vbs,
                split=split)["x"]
    for g in idx:
        var = x[g].var(axis=(0, 2))
        scale = np.abs(dy[g]).sum() * 1.7 / np.sqrt(var.min() + 1e-5)
        np.testing.assert_allclose(dx[g].sum(axis=(0, 2)), 0, atol=1e-13 * scale)


@pytest.mark.checks("eval_equals_batch_norm_eval")
@given(seed=st.integers(0, 2**32 - 1), vbs=st.integers(1, 5), split=st.sampled_from(["chunk_ceil", "fixed"]))
def test_eval_equals_batch_norm_eval(seed, vbs, split):
    """With running statistics, inference ignores the ghost batches: batch_norm eval, VJP included."""
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal((7, 3, 2)), rng.standard_normal((7, 3, 2))
    inputs = {"x": x, "weight": rng.standard_normal(3), "bias": rng.standard_normal(3)}
    state = _state(rng, 3)
    hp = {"virtual_batch_size": vbs, "split": split, "training": False}
    out, new_state = OP.apply(inputs, state, **hp)
    ref, _ = BN.apply(inputs, state, training=False)
    np.testing.assert_array_equal(out["y"], ref["y"])
    assert new_state.keys() == state.keys()
    for key in state:
        np.testing.assert_array_equal(new_state[key], state[key])
    g, ref_g = OP.vjp(inputs, state, {"y": dy}, **hp), BN.vjp(inputs, state, {"y": dy}, training=False)
    for key in ref_g:
        np.testing.assert_allclose(g[key], ref_g[key], rtol=1e-14, atol=1e-15)


def test_untracked_eval_uses_ghost_statistics():
    """No running statistics: inference normalizes each ghost batch by its own statistics."""
    x = RNG.standard_normal((9, 3, 2))
    hp = {"virtual_batch_size": 4, "track_running_stats": False}
    y_eval = OP.apply({"x": x}, None, **hp, training=False)[0]["y"]
    np.testing.assert_array_equal(y_eval, OP.apply({"x": x}, None, **hp)[0]["y"])
    for g in groups(9, 4, "chunk_ceil"):
        np.testing.assert_allclose(y_eval[g], BN.apply({"x": x[g]}, None, training=False,
                                                       track_running_stats=False)[0]["y"], rtol=1e-14)


# --- PyTorch cross-checks (float64) -------------------------------------------------------------


def _torch_bn(torch, shape, momentum, eps, w, b):
    cls = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
    bn = cls(shape[1], eps=eps, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(t64(w))
        bn.bias.copy_(t64(b))
    return bn


@pytest.mark.parametrize("dialect", ["hoffer", "composer", "tabnet"])
@pytest.mark.parametrize(("shape", "vbs"), [((10, 3), 4), ((9, 3, 4), 2), ((11, 2, 3, 2), 3), ((6, 3), 8)])
def test_matches_torch_bn_module_called_per_chunk(dialect, shape, vbs):
    """Hoffer's, Composer's and tabnet's construction: one torch BatchNorm module called on each
    torch.chunk of the batch (Composer with the momentum divided by its nchunks), over 3 training
    steps and an eval step: outputs, autograd gradients, running statistics and the step count."""
    torch = torch_or_skip()
    hp = {**OP.dialect(dialect), "virtual_batch_size": vbs}
    n = shape[0]
    if dialect == "hoffer":
        k = n // vbs
    else:
        k = math.ceil(n / vbs)
    if k == 0 or (dialect == "composer" and n < vbs):
        with pytest.raises(ValueError):
            OP.apply({"x": RNG.standard_normal(shape)}, None, **hp)
        return
    w, b = 1 + 0.3 * RNG.standard_normal(shape[1]), RNG.standard_normal(shape[1])
    bn = _torch_bn(torch, shape, hp["momentum"], hp["eps"], w, b)
    state = None
    for step in range(4):
        training = step < 3
        x, dy = RNG.standard_normal(shape) * (step + 1) + step, RNG.standard_normal(shape)
        bn.train(training)
        tx = t64(x, True)
        if training and hp["chunk_momentum"] == "divided":
            bn.momentum = hp["momentum"] / k
        ty = torch.cat([bn(c) for c in tx.chunk(k, 0)], 0)
        bn.momentum = hp["momentum"]
        step_hp = {**hp, "training": training}
        inputs = {"x": x, "weight": w, "bias": b}
        grads = OP.vjp(inputs, state, {"y": dy}, **step_hp)
        out, state = OP.apply(inputs, state, **step_hp)
        np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-12, atol=1e-13)
        expected = torch_vjp(ty, {"x": tx, "weight": bn.weight, "bias": bn.bias}, dy)
        for key in expected:
            np.testing.assert_allclose(grads[key], expected[key], rtol=1e-11, atol=1e-12, err_msg=key)
        np.testing.assert_allclose(state["running_mean"], bn.running_mean.numpy(), rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(state["running_var"], bn.running_var.numpy(), rtol=1e-13)
        assert int(state["num_batches_tracked"]) == int(bn.num_batches_tracked)


def test_cumulative_average_matches_torch_module_momentum_none():
    """momentum=None: each ghost batch is one batch of torch's cumulative average."""
    torch = torch_or_skip()
    module = torch.nn.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    state = None
    for k in range(3):
        x = RNG.standard_normal((8, 3)) + k
        for c in t64(x).chunk(math.ceil(8 / 3)):  # 3, 3, 2
            module(c)
        _, state = OP.apply({"x": x}, state, momentum=None, virtual_batch_size=3)
    np.testing.assert_allclose(state["running_mean"], module.running_mean.numpy(), rtol=1e-13)
    np.testing.assert_allclose(state["running_var"], module.running_var.numpy(), rtol=1e-13)
    assert int(module.num_batches_tracked) == int(state["num_batches_tracked"]) == 9


@pytest.mark.parametrize(("shape", "splits"), [((8, 3, 2, 2), 4), ((6, 2, 3, 1), 3), ((4, 3, 2, 3), 1)])
def test_matches_cifar10_fast_view_form(shape, splits):
    """cifar10-fast: F.batch_norm on x.view(-1, C*s, H, W) with s*C running statistics and gamma,
    beta repeated s times; the per-split statistics averaged at eval time."""
    torch = torch_or_skip()
    n, c = shape[:2]
    hp = {**OP.dialect("cifar10_fast"), "virtual_batch_size": n // splits}
    w, b = 1 + 0.3 * RNG.standard_normal(c), RNG.standard_normal(c)
    rm, rv = torch.zeros(c * splits, dtype=torch.float64), torch.ones(c * splits, dtype=torch.float64)
    state = None
    for step in range(3):
        x, dy = RNG.standard_normal(shape) + step, RNG.standard_normal(shape)
        tx, tw, tb = t64(x, True), t64(w, True), t64(b, True)
        ty = torch.nn.functional.batch_norm(
            tx.view(-1, c * splits, *shape[2:]), rm, rv, tw.repeat(splits), tb.repeat(splits),
            True, hp["momentum"], hp["eps"]).view(shape)
        inputs = {"x": x, "weight": w, "bias": b}
        grads = OP.vjp(inputs, state, {"y": dy}, **hp)
        out, state = OP.apply(inputs, state, **hp)
        np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-12, atol=1e-13)
        expected = torch_vjp(ty, {"x": tx, "weight": tw, "bias": tb}, dy)
        for key in expected:
            np.testing.assert_allclose(grads[key], expected[key], rtol=1e-11, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(state["running_mean"], rm.view(splits, c).mean(0).numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(state["running_var"], rv.view(splits, c).mean(0).numpy(), rtol=1e-13)


@pytest.mark.parametrize(("shape", "vbs"), [((6, 3), 2), ((8, 2, 3), 4), ((6, 2, 2, 3), 3), ((5, 4), 5)])
def test_matches_tf_keras_reshape_form(shape, vbs):
    """tf.keras virtual_batch_size (TensorFlow is not installed): its training path restated in
    torch, differentiated by autograd: reshape to (vbs, N/vbs, ...), biased moments over every axis
    but the ghost and channel axes, the moving averages updated once with decay 1 - momentum from
    the ghost-averaged moments."""
    torch = torch_or_skip()
    hp = {**OP.dialect("tf_keras"), "virtual_batch_size": vbs}
    n, c = shape[0], shape[-1]
    k = n // vbs
    w, b = 1 + 0.3 * RNG.standard_normal(c), RNG.standard_normal(c)
    moving_mean, moving_var = np.zeros(c), np.ones(c)
    state = None
    for step in range(3):
        x, dy = RNG.standard_normal(shape) * 2 + step, RNG.standard_normal(shape)
        tx, tw, tb = t64(x, True), t64(w, True), t64(b, True)
        v = tx.reshape(vbs, k, *shape[1:])
        axes = [0, *range(2, v.ndim - 1)]
        mean = v.mean(dim=axes, keepdim=True)
        var = ((v - mean) ** 2).mean(dim=axes, keepdim=True)
        ty = ((v - mean) / torch.sqrt(var + hp["eps"]) * tw + tb).reshape(shape)
        decay = 1 - hp["momentum"]
        moving_mean = moving_mean - (moving_mean - mean.detach().mean(dim=1).reshape(-1).numpy()) * decay
        moving_var = moving_var - (moving_var - var.detach().mean(dim=1).reshape(-1).numpy()) * decay
        inputs = {"x": x, "weight": w, "bias": b}
        grads = OP.vjp(inputs, state, {"y": dy}, **hp)
        out, state = OP.apply(inputs, state, **hp)
        np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-12, atol=1e-13)
        expected = torch_vjp(ty, {"x": tx, "weight": tw, "bias": tb}, dy)
        for key in expected:
            np.testing.assert_allclose(grads[key], expected[key], rtol=1e-11, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(state["running_mean"], moving_mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(state["running_var"], moving_var, rtol=1e-13)
