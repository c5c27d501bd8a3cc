"""Learning-rate schedules and batch-size rules (reference/optimizers/schedules.py).

(1) the invariants the papers state, as hypothesis properties; (2) float64 cross-checks of every
spec case against the real torch schedulers and optax schedules through the mapping files
(bit-exact for torch's recursive dialect, ~1e-16 normwise for the closed forms); (3) bad input.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import reference
from reference.optimizers.schedules import (
    cosine,
    linear_scaling_rule,
    linear_warmup,
    one_cycle,
    polynomial,
    sqrt_scaling_rule,
    step_decay,
)

SCHEDULES = reference.ops("schedules")
EPS = np.finfo(np.float64).eps


def steps(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (normwise relative error)."""
    scale = float(np.max(np.abs(b))) if np.size(b) else 0.0
    err = float(np.max(np.abs(np.asarray(a) - b))) if np.size(b) else 0.0
    return err / scale if scale else err


lrs = st.floats(1e-4, 10.0)
small_lrs = st.floats(0.0, 1e-2)


# --------------------------------------------------------------------------------------------
# (1) properties
# --------------------------------------------------------------------------------------------


@given(peak=lrs, k=st.floats(1.0, 64.0), w=st.integers(1, 60), extra=st.integers(0, 20))
def test_warmup_value_is_linear_in_i_then_constant(peak, k, w, extra):
    """Goyal Sec. 2.2 (B1): lr_i = eta_base + (k eta - eta_base) i / W for i < W, then k eta."""
    init = peak / k
    lr = linear_warmup(steps(w + extra + 1), peak_lr=peak, init_lr=init, warmup_steps=w)
    for i in range(w):
        exact = Fraction(init) + (Fraction(peak) - Fraction(init)) * i / w
        assert abs(Fraction(lr[i]) - exact) <= 4 * EPS * exact
    assert np.all(lr[w:] == peak)  # reaches k eta at W exactly, constant afterwards
    rec = linear_warmup(steps(w + extra + 1), peak_lr=peak, init_lr=init, warmup_steps=w,
                        form="recursive")
    assert rel(rec, lr) <= 8 * EPS * w  # one rounding per recursive step


@given(lr=lrs, w=st.integers(1, 50), form=st.sampled_from(["closed", "recursive"]))
def test_warmup_with_k_equal_1_is_constant(lr, w, form):
    out = linear_warmup(steps(w + 5), peak_lr=lr, init_lr=lr, warmup_steps=w, form=form)
    assert np.all(out == lr)


@given(base=lrs, gamma=st.floats(0.05, 0.95), size=st.integers(1, 12), n=st.integers(1, 80),
       form=st.sampled_from(["closed", "recursive"]))
def test_step_decay_is_piecewise_constant_with_gamma_jumps(base, gamma, size, n, form):
    lr = step_decay(steps(n), base_lr=base, gamma=gamma, step_size=size, form=form)
    assert lr[0] == base
    for i in range(1, n):
        if i % size:
            assert lr[i] == lr[i - 1]
        elif form == "recursive":
            assert lr[i] == lr[i - 1] * gamma  # torch StepLR: group["lr"] * gamma
        else:
            assert lr[i] == pytest.approx(lr[i - 1] * gamma, rel=4 * EPS)
    by_marks = step_decay(steps(n), base_lr=base, gamma=gamma, form=form,
                          milestones=tuple(range(size, n + size, size)))
    np.testing.assert_array_equal(by_marks, lr)  # MultiStepLR at k*step_size == StepLR


@pytest.mark.parametrize("form", ["closed", "recursive"])
def test_repeated_milestone_counts_twice(form):
    lr = step_decay(steps(12), base_lr=1.0, gamma=0.5, milestones=(4, 8, 8), form=form)
    assert lr[3] == 1.0 and lr[4] == 0.5 and lr[7] == 0.5 and lr[8] == 0.125 and lr[11] == 0.125


@given(base=lrs, frac=st.floats(0.0, 0.9), total=st.integers(2, 300),
       form=st.sampled_from(["closed", "recursive"]))
def test_cosine_endpoints_monotone_and_symmetric(base, frac, total, form):
    eta_min = base * frac
    lr = cosine(steps(total + 1), base_lr=base, total_steps=total, eta_min=eta_min, form=form)
    assert lr[0] == pytest.approx(base, rel=2 * EPS)  # eta_min + (base - eta_min) * 1
    assert lr[total] == pytest.approx(eta_min, rel=0, abs=16 * EPS * total * base)
    if form == "closed":
        assert lr[total] == eta_min  # cos(pi) = -1 exactly: SGDR Eq. 5 ends at eta_min
    assert np.all(np.diff(lr) <= 8 * EPS * base)
    mirrored = lr + lr[::-1]  # lr(s) + lr(T - s) = base + eta_min
    np.testing.assert_allclose(mirrored, base + eta_min, rtol=0, atol=16 * EPS * total * base)


@given(base=lrs, total=st.integers(2, 100), extra=st.integers(1, 100))
def test_cosine_past_end_holds_or_follows_the_cosine(base, total, extra):
    t = steps(total + extra + 1)
    held = cosine(t, base_lr=base, total_steps=total, eta_min=0.01 * base)
    assert np.all(held[total:] == 0.01 * base)
    periodic = cosine(t, base_lr=base, total_steps=total, eta_min=0.01 * base, past_end="periodic")
    s = np.arange(0, min(extra, total) + 1)
    np.testing.assert_allclose(periodic[total + s], periodic[total - s], rtol=0, atol=8 * EPS * base)
    rec = cosine(t, base_lr=base, total_steps=total, eta_min=0.01 * base, past_end="periodic",
                 form="recursive")
    assert rel(rec, periodic) <= 64 * EPS * (total + extra)


@given(init=small_lrs, base=lrs, w=st.integers(1, 30), total=st.integers(1, 60),
       exponent=st.floats(0.5, 3.0))
def test_warmup_is_linear_then_cosine(init, base, w, total, exponent):
    total = w + total
    t = steps(total + 3)
    lr = cosine(t, base_lr=base, total_steps=total, warmup_steps=w, warmup_init_lr=init,
                eta_min=0.001 * base, exponent=exponent)
    ramp = init + (base - init) * t[:w] / w
    np.testing.assert_array_equal(lr[:w], ramp)
    assert lr[w] == base
    plain = cosine(t[: total - w + 1], base_lr=base, total_steps=total - w, eta_min=0.001 * base,
                   exponent=exponent)
    np.testing.assert_array_equal(lr[w:total + 1], plain)  # the cosine restarts its clock at W


@given(base=lrs, frac=st.floats(0.0, 0.5), total=st.integers(1, 200), begin=st.integers(0, 20))
def test_polynomial_power_1_is_linear_and_power_2_is_its_square(base, frac, total, begin):
    end = base * frac
    t = steps(begin + total + 5)
    lin = polynomial(t, base_lr=base, end_lr=end, power=1.0, total_steps=total,
                     transition_begin=begin)
    # (base - end) * 1 + end: the formula as optax writes it, within one rounding of base
    np.testing.assert_allclose(lin[: begin + 1], base, rtol=2 * EPS)
    assert np.all(lin[begin + total:] == end)
    for i in range(begin, begin + total):
        exact = Fraction(end) + (Fraction(base) - Fraction(end)) * (1 - Fraction(i - begin, total))
        assert abs(Fraction(lin[i]) - exact) <= 4 * EPS * Fraction(base)
    quad = polynomial(t, base_lr=base, end_lr=end, power=2.0, total_steps=total,
                      transition_begin=begin)
    lin_factor = (lin - end) / (base - end) if base > end else np.zeros_like(lin)
    if base > end:
        np.testing.assert_allclose((quad - end) / (base - end), lin_factor**2, rtol=0, atol=1e-14)


@given(base=lrs, power=st.floats(0.5, 4.0), total=st.integers(1, 150))
def test_polynomial_recursive_equals_closed_to_rounding(base, power, total):
    t = steps(total + 10)
    closed = polynomial(t, base_lr=base, power=power, total_steps=total)
    rec = polynomial(t, base_lr=base, power=power, total_steps=total, form="recursive")
    assert rec[0] == base and np.all(rec[total:] == rec[total])
    np.testing.assert_allclose(rec, closed, rtol=0, atol=32 * EPS * total * power * base)


@st.composite
def one_cycle_hp(draw):
    total = draw(st.integers(8, 200))
    pct = draw(st.floats(0.1, 0.45))
    return {"max_lr": draw(lrs), "total_steps": total, "pct_start": pct,
            "div_factor": draw(st.floats(2.0, 100.0)),
            "final_div_factor": draw(st.floats(1.0, 1e5)),
            "anneal": draw(st.sampled_from(["cos", "linear"])),
            "three_phase": draw(st.booleans()),
            "boundary": draw(st.sampled_from(["shifted", "truncated"]))}


@given(hp=one_cycle_hp())
def test_one_cycle_start_peak_and_final_values(hp):
    total, pct = hp["total_steps"], hp["pct_start"]
    initial = hp["max_lr"] / hp["div_factor"]
    final = initial / hp["final_div_factor"]
    try:
        lr = one_cycle(steps(total + 3), **hp)
    except ValueError:  # a phase of zero length (pct_start * T too small): tested elsewhere
        assume(False)
    if hp["boundary"] == "shifted":
        peak_at, last = float(pct * total) - 1, total - 1
    else:
        peak_at, last = float(int(pct * total)), total
    assume(peak_at > 0)
    assert lr[0] == pytest.approx(initial, rel=4 * EPS)
    assert np.max(lr) <= hp["max_lr"] * (1 + 4 * EPS)
    i = int(peak_at)
    if i == peak_at:  # the peak is an integer step: max_lr exactly there (up to one rounding)
        assert lr[i] == pytest.approx(hp["max_lr"], rel=4 * EPS)
    assert lr[last] == pytest.approx(final, rel=1e-12)  # initial / final_div_factor
    if hp["boundary"] == "truncated":
        assert np.all(lr[total:] == final)
    if hp["three_phase"]:
        back_at = (float(2 * pct * total) - 2 if hp["boundary"] == "shifted"
                   else float(int(2 * pct * total)))
        if int(back_at) == back_at and back_at < last:
            assert lr[int(back_at)] == pytest.approx(initial, rel=1e-12)


def test_one_cycle_torch_peak_is_one_step_before_optax_peak():
    common = {"max_lr": 1.0, "total_steps": 100, "pct_start": 0.3}
    torch_lr = one_cycle(steps(101), **common, boundary="shifted")
    optax_lr = one_cycle(steps(101), **common, boundary="truncated")
    assert int(np.argmax(torch_lr)) == 29 and torch_lr[29] == 1.0  # float(0.3 * 100) - 1
    assert int(np.argmax(optax_lr)) == 30  # int(0.3 * 100)
    assert optax_lr[100] == pytest.approx(1.0 / 25 / 1e4, rel=1e-15)


def test_one_cycle_linear_phases_are_linear():
    lr = one_cycle(steps(61), max_lr=1.0, total_steps=60, pct_start=0.25, anneal="linear",
                   three_phase=True)
    ends = [14, 28, 59]  # 0.25*60 - 1, 2*0.25*60 - 2, 60 - 1
    for a, b in zip([0, *ends[:-1]], ends, strict=True):
        np.testing.assert_allclose(np.diff(lr[a:b + 1], 2), 0.0, atol=1e-15)
    assert lr[14] == 1.0 and lr[28] == pytest.approx(0.04, rel=1e-15)


# --------------------------------------------------------------------------------------------
# Harness form, float32 and array-API purity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
def test_harness_form_and_no_vjp(name):
    op = reference.get(name)
    spec = op.spec
    assert spec.family == "schedules" and not spec.differentiable
    assert [t.name for t in spec.inputs] == ["t"] and spec.inputs[0].exact
    for case in spec.cases:
        t = steps(case["shapes"]["t"][0])
        out, state = op.apply({"t": t}, None, **case["hparams"])
        assert state == {} and out["lr"].shape == t.shape and out["lr"].dtype == np.float64
        assert np.all(np.isfinite(out["lr"]))
        with pytest.raises(TypeError, match="has no VJP: it has no differentiable input"):
            op.vjp({"t": t}, None, {"lr": np.ones_like(t)}, **case["hparams"])
    assert spec.backward == "none" and not spec.vjp
    with pytest.raises(TypeError, match="has no VJP: backward = 'none'"):
        op.vjp_function  # noqa: B018 - the property raises


@pytest.mark.parametrize("name", SCHEDULES)
def test_float32_baseline_path_and_array_api_strict(name):
    op = reference.get(name)
    raw = op.function.__wrapped__
    xs = pytest.importorskip("array_api_strict")
    for case in op.spec.cases:
        t = steps(case["shapes"]["t"][0])
        ref = op.apply({"t": t}, None, **case["hparams"])[0]["lr"]
        low = raw(t.astype(np.float32), **case["hparams"])
        assert low.dtype == np.float32
        np.testing.assert_allclose(low, ref, rtol=0, atol=1e-5 * np.max(np.abs(ref)))
        strict = op.apply({"t": xs.asarray(t)}, None, **case["hparams"])[0]["lr"]
        np.testing.assert_array_max_ulp(np.asarray(strict), ref, maxulp=1)


def test_any_shape_and_empty_t():
    t = np.array([[0.0, 3.0], [7.0, 30.0]])
    out = step_decay(t, step_size=3, gamma=0.5, base_lr=1.0)
    np.testing.assert_array_equal(out, [[1.0, 0.5], [0.25, 2.0**-10]])
    assert cosine(np.zeros((0,)), form="recursive").shape == (0,)


# --------------------------------------------------------------------------------------------
# (2) float64 cross-checks against torch and optax through the mapping files
# --------------------------------------------------------------------------------------------


def _frameworks():
    out = []
    for fw, module in (("torch", "conformance.adapters._torch_schedules"),
                       ("optax", "conformance.adapters._optax_schedules")):
        out.append(pytest.param(fw, module, id=fw))
    return out


def _mapping(module: str):
    if "optax" in module:
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        pytest.importorskip("optax")
    else:
        pytest.importorskip("torch")
    import importlib

    return importlib.import_module(module)


CASES = [(name, case["name"]) for name in SCHEDULES for case in reference.get(name).spec.cases]


@pytest.mark.parametrize(("fw", "module"), _frameworks())
def test_mapping_dialects_equal_the_specs(fw, module):
    mapping = _mapping(module)
    assert set(mapping.SCHEDULES) == set(SCHEDULES) == set(mapping.DIALECTS) == set(mapping.API)
    for name in SCHEDULES:
        assert mapping.DIALECTS[name] == reference.get(name).spec.dialects[fw]["hparams"]


@pytest.mark.parametrize(("fw", "module"), _frameworks())
@pytest.mark.parametrize(("name", "case_name"), CASES)
def test_cases_match_framework(fw, module, name, case_name):
    """Each spec case under the framework's dialect: torch's recursion bit for bit; closed forms
    (torch step(epoch), optax) to a few ulp of the schedule's scale."""
    from conformance.adapters import Unsupported

    mapping = _mapping(module)
    op = reference.get(name)
    case = next(c for c in op.spec.cases if c["name"] == case_name)
    hp = op.spec.resolve({**mapping.DIALECTS[name], **case["overrides"]})
    t = steps(case["shapes"]["t"][0])
    forms = [hp["form"], "closed"] if fw == "torch" and "form" in hp else [hp.get("form")]
    checked = 0
    for form in dict.fromkeys(forms):
        run = dict(hp) if form is None else {**hp, "form": form}
        ref = op.apply({"t": t}, None, **run)[0]["lr"]
        try:
            got = mapping.SCHEDULES[name](t, run)
        except Unsupported:
            continue
        checked += 1
        assert got.shape == t.shape and got.dtype == np.float64
        if fw == "optax" and name == "polynomial" and run["power"] != int(run["power"]):
            end = run["transition_begin"] + run["total_steps"]
            assert rel(got[t < end], ref[t < end]) <= 1e-15
            if not np.array_equal(got[t >= end], ref[t >= end]):
                pytest.xfail("XLA turns 1 - s/T into fma(-s, 1/T, 1) < 0 at s = T: "
                             "(negative)**power is NaN (see test_optax_jit_polynomial_end)")
            continue
        if fw == "torch" and form != "closed":
            np.testing.assert_array_equal(got, ref)  # the same Python-float operations
        else:
            assert rel(got, ref) <= 1e-15, f"{fw} {name}/{case_name} form={form}"
    if case["dialect"] == fw:
        assert checked, f"{fw} refused its own dialect's case {name}/{case_name}"


def _torch_exact(name, t, **hp):
    mapping = _mapping("conformance.adapters._torch_schedules")
    run = reference.get(name).spec.resolve({**mapping.DIALECTS[name], **hp})
    np.testing.assert_array_equal(mapping.SCHEDULES[name](t, run),
                                  reference.get(name).apply({"t": t}, None, **run)[0]["lr"])


@settings(max_examples=10)
@given(hp=one_cycle_hp())
def test_one_cycle_matches_torch_exactly(hp):
    hp = {**hp, "boundary": "shifted"}
    assume(float(hp["pct_start"] * hp["total_steps"]) - 1 > 0)
    if hp["three_phase"]:
        assume(float(2 * hp["pct_start"] * hp["total_steps"]) - 2
               > float(hp["pct_start"] * hp["total_steps"]) - 1)
    _torch_exact("one_cycle", steps(hp["total_steps"] + 1), **hp)


@settings(max_examples=10)
@given(base=lrs, frac=st.floats(0.0, 0.9), total=st.integers(1, 120), extra=st.integers(0, 150))
def test_cosine_matches_torch_recursion_exactly(base, frac, total, extra):
    _torch_exact("cosine", steps(total + extra + 1), base_lr=base, total_steps=total,
                 eta_min=frac * base)


@settings(max_examples=10)
@given(base=lrs, k=st.floats(1.0, 100.0), w=st.integers(1, 100), power=st.floats(0.5, 4.0),
       gamma=st.floats(0.01, 1.0), size=st.integers(1, 20),
       marks=st.lists(st.integers(0, 120), max_size=5))
def test_warmup_polynomial_and_step_decay_match_torch_exactly(base, k, w, power, gamma, size,
                                                              marks):
    t = steps(150)
    _torch_exact("linear_warmup", t, peak_lr=base, init_lr=base / k, warmup_steps=w)
    _torch_exact("polynomial", t, base_lr=base, power=power, total_steps=w)
    _torch_exact("step_decay", t, base_lr=base, gamma=gamma, step_size=size,
                 milestones=tuple(marks) or None)


def test_optax_jit_polynomial_end():
    """A framework discrepancy, documented: jitted optax.polynomial_schedule with a fractional
    power at t >= begin + T.  XLA rewrites count / T as count * (1/T) and contracts
    1 - count * (1/T) into an FMA: for T = 40 (1/T inexact) the factor is -5.6e-17, and
    (-5.6e-17) ** 0.5 is NaN; the oracle (and eager optax) give end_lr.  Where the rounding goes
    the other way (T = 30) the factor is +5.6e-17 and the lr is end_lr + 7e-10 (relative error 7e-6
    at end_lr = 1e-4).  Integer powers and T with an exact reciprocal (32, 64) are unaffected."""
    optax_map = _mapping("conformance.adapters._optax_schedules")
    t = steps(45)
    for total in (40, 30, 32):
        hp = reference.get("polynomial").spec.resolve(
            {"power": 0.5, "total_steps": total, "end_lr": 1e-4})
        ref = polynomial(t, **hp)
        got = optax_map.SCHEDULES["polynomial"](t, hp)
        np.testing.assert_allclose(got[:total], ref[:total], rtol=1e-14)
        assert np.all(ref[total:] == 1e-4)
        tail = got[total:]
        # NaN, end_lr + O(sqrt(eps)), or exact: the value depends on how XLA rounds 1/T
        assert np.all(np.isnan(tail)) or np.all(np.abs(tail - 1e-4) <= 1e-9)


def test_unsupported_values_are_refused():
    from conformance.adapters import Unsupported

    torch_map = _mapping("conformance.adapters._torch_schedules")
    optax_map = _mapping("conformance.adapters._optax_schedules")
    t = steps(30)
    cos = reference.get("cosine").spec.resolve({"total_steps": 10, "past_end": "hold",
                                                "form": "recursive"})
    with pytest.raises(Unsupported, match="cannot hold eta_min"):
        torch_map.SCHEDULES["cosine"](t, cos)
    with pytest.raises(Unsupported, match="holds its end value"):
        optax_map.SCHEDULES["cosine"](t, {**cos, "form": "closed", "past_end": "periodic"})
    oc = reference.get("one_cycle").spec.resolve({"total_steps": 20})
    with pytest.raises(Unsupported, match="raises past total_steps"):
        torch_map.SCHEDULES["one_cycle"](t, oc)
    with pytest.raises(Unsupported, match="does not implement"):
        torch_map.SCHEDULES["polynomial"](t, {**reference.get("polynomial").spec.defaults(),
                                              "form": "recursive", "new_knob": 1})
    with pytest.raises(Unsupported, match="start_factor"):
        torch_map.SCHEDULES["linear_warmup"](t, {**reference.get("linear_warmup").spec.defaults(),
                                                 "init_lr": 0.0})


# --------------------------------------------------------------------------------------------
# Batch-size rules
# --------------------------------------------------------------------------------------------


def test_linear_scaling_rule():
    """Goyal Sec. 2.1: eta = 0.1 kn / 256 (3.2 for kn = 8192); linear in the batch."""
    assert linear_scaling_rule(256) == 0.1
    assert linear_scaling_rule(8192) == pytest.approx(3.2, rel=EPS)
    batches = np.array([32.0, 64.0, 1024.0])
    np.testing.assert_allclose(linear_scaling_rule(batches, base_lr=0.2, base_batch=32),
                               0.2 * batches / 32, rtol=EPS)


def test_sqrt_scaling_rule():
    """Hoffer et al.: eta sqrt(B / B_small); their code: lr0 * (batch_size / 128) ** 0.5."""
    assert sqrt_scaling_rule(128) == 0.1
    assert sqrt_scaling_rule(2048) == pytest.approx(0.4, rel=EPS)
    for batch in (256, 1000, 4096, 65536):
        assert sqrt_scaling_rule(batch) == pytest.approx(0.1 * (batch / 128) ** 0.5, rel=2 * EPS)
    # quadrupling the batch doubles the rate
    assert sqrt_scaling_rule(4 * 300.0, base_lr=0.3) == pytest.approx(
        2 * sqrt_scaling_rule(300.0, base_lr=0.3), rel=2 * EPS)
    np.testing.assert_allclose(sqrt_scaling_rule(np.array([128.0, 512.0])), [0.1, 0.2], rtol=EPS)


@pytest.mark.parametrize("rule", [linear_scaling_rule, sqrt_scaling_rule])
def test_scaling_rules_reject_bad_batches(rule):
    with pytest.raises(ValueError, match="batch must be finite and > 0"):
        rule(0)
    with pytest.raises(ValueError, match="base_batch must be finite and > 0"):
        rule(64, base_batch=-1)
    with pytest.raises(ValueError, match="base_lr must be finite and >= 0"):
        rule(64, base_lr=math.inf)
    with pytest.raises(TypeError, match="batch must be a number"):
        rule(True)
    with pytest.raises(TypeError, match="batch must be a number or an array, got list"):
        rule([64, 128])
    with pytest.raises(ValueError, match="batch must be finite"):
        rule(np.array([64.0, np.nan]))


# --------------------------------------------------------------------------------------------
# (3) bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize(("t", "pattern"), [
    (np.array([0.0, -1.0]), "t must hold non-negative step counts"),
    (np.array([0.0, 1.5]), "t must hold integer step counts.*1.5"),
    (np.array([0.0, np.nan]), "t must hold finite step counts"),
])
def test_bad_step_counts_name_t(name, t, pattern):
    with pytest.raises(ValueError, match=f"{name}: {pattern}"):
        reference.get(name).apply({"t": t}, None)


def test_integer_arrays_are_rejected_by_the_registry_lists_are_accepted():
    with pytest.raises(TypeError, match="cosine: t must have a real floating dtype"):
        cosine(np.arange(3))
    np.testing.assert_array_equal(cosine([0, 100], total_steps=100), [0.1, 0.0])


@pytest.mark.parametrize(("fn", "hp", "exc", "pattern"), [
    (step_decay, {"gamma": -0.5}, ValueError, "'gamma' must be float >= 0.0"),
    (step_decay, {"step_size": 0}, ValueError, "'step_size' must be int >= 1"),
    (step_decay, {"milestones": (3, -2)}, ValueError, "'milestones' must hold step counts >= 0"),
    (step_decay, {"form": "chained"}, ValueError, "'form' must be str one of 'closed', 'recursive'"),
    (linear_warmup, {"peak_lr": 0.0}, ValueError, "'peak_lr' must be float > 0.0"),
    (linear_warmup, {"warmup_steps": 2.5}, TypeError, "'warmup_steps' must be an int"),
    (cosine, {"total_steps": 5, "warmup_steps": 5}, ValueError, "'total_steps' must exceed warmup"),
    (cosine, {"past_end": "restart"}, ValueError, "'past_end' must be str one of 'hold', 'periodic'"),
    (cosine, {"exponent": 0.0}, ValueError, "'exponent' must be float > 0.0"),
    (polynomial, {"power": -1.0}, ValueError, "'power' must be float > 0.0"),
    (polynomial, {"lr": 0.1}, TypeError, "unexpected keyword argument 'lr'"),
    (one_cycle, {"pct_start": 1.5}, ValueError, "'pct_start' must be float > 0.0 and < 1.0"),
    (one_cycle, {"total_steps": 3}, ValueError, "phases must have positive lengths"),
    (one_cycle, {"three_phase": True, "pct_start": 0.4, "pct_final": 0.3}, ValueError,
     "phases must have positive lengths"),
    (one_cycle, {"boundary": "torch"}, ValueError, "'boundary' must be str one of 'shifted', 'truncated'"),
])
def test_bad_hparams_name_the_argument(fn, hp, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn(steps(10), **hp)
