"""Learning-rate schedules and batch-size rules (reference/optimizers/schedules.py).

(1) the invariants the papers state, as hypothesis properties; (2) float64 cross-checks of every
spec case against the real torch schedulers and optax schedules through the mapping files
(bit-exact for torch's recursive dialect, ~1e-16 normwise for the closed forms); (3) bad input.
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given, reject, settings
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
EPS = np.finfo(np.float64).eps  # 2^-52, one ulp of 1
U = EPS / 2  # 2^-53: the unit roundoff, the largest relative error of one rounded operation


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


@pytest.mark.checks("warmup_value_is_linear_in_i", "reaches_peak_at_W_then_constant")
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
    assert np.all(rec[w:] == rec[w])  # torch's LinearLR stops multiplying after W steps


@pytest.mark.checks("constant_when_k_is_1")
@given(lr=lrs, w=st.integers(1, 50), form=st.sampled_from(["closed", "recursive"]))
def test_warmup_with_k_equal_1_is_constant(lr, w, form):
    """B1 with k = 1 (init_lr == peak_lr): every step of the warmup is the same lr."""
    out = linear_warmup(steps(w + 5), peak_lr=lr, init_lr=lr, warmup_steps=w, form=form)
    assert np.all(out == lr)


@pytest.mark.checks("piecewise_constant", "decays_by_gamma_at_each_boundary",
                    "milestones_at_multiples_equal_step_size")
@given(base=lrs, gamma=st.floats(0.05, 0.95), size=st.integers(1, 12), n=st.integers(1, 80),
       form=st.sampled_from(["closed", "recursive"]))
def test_step_decay_is_piecewise_constant_with_gamma_jumps(base, gamma, size, n, form):
    """StepLR: constant between multiples of step_size, times gamma at each; MultiStepLR with
    milestones at those multiples gives the same lr bit for bit."""
    lr = step_decay(steps(n), base_lr=base, gamma=gamma, step_size=size, form=form)
    assert lr[0] == base
    for i in range(1, n):
        if i % size:
            assert lr[i] == lr[i - 1]
        elif form == "recursive":
            assert lr[i] == lr[i - 1] * gamma  # torch StepLR: group["lr"] * gamma
        else:
            # two powers (< 1 ulp each) and three products: at most 7 U relative
            assert lr[i] == pytest.approx(lr[i - 1] * gamma, rel=7 * U, abs=0)
    by_marks = step_decay(steps(n), base_lr=base, gamma=gamma, form=form,
                          milestones=tuple(range(size, n + size, size)))
    np.testing.assert_array_equal(by_marks, lr)  # MultiStepLR at k*step_size == StepLR


@pytest.mark.checks("piecewise_constant", "decays_by_gamma_at_each_boundary")
@given(base=lrs, gamma=st.floats(0.05, 0.95), marks=st.lists(st.integers(0, 60), min_size=1, max_size=6),
       form=st.sampled_from(["closed", "recursive"]))
def test_step_decay_milestones_are_piecewise_constant_with_gamma_jumps(base, gamma, marks, form):
    """MultiStepLR: constant between milestones; lr(b) = gamma^count lr(b - 1) at a milestone b
    listed count times (lr(0) = gamma^count base for a milestone 0)."""
    lr = step_decay(steps(70), base_lr=base, gamma=gamma, milestones=tuple(marks), form=form)
    times = Counter(marks)
    before = base
    for i, value in enumerate(lr):
        if i not in times:
            assert value == before
        elif form == "recursive":
            assert value == before * gamma ** times[i]  # torch: group["lr"] * gamma ** count
        else:
            # base * gamma**n against (base * gamma**(n - c)) * gamma**c: three powers (< 1 ulp
            # each) and three products (1/2 ulp each), at most 9 U relative
            assert value == pytest.approx(before * gamma ** times[i], rel=9 * U, abs=0)
        before = value


@pytest.mark.parametrize("form", ["closed", "recursive"])
def test_repeated_milestone_counts_twice(form):
    lr = step_decay(steps(12), base_lr=1.0, gamma=0.5, milestones=(4, 8, 8), form=form)
    assert lr[3] == 1.0 and lr[4] == 0.5 and lr[7] == 0.5 and lr[8] == 0.125 and lr[11] == 0.125


@pytest.mark.checks("starts_at_base_lr", "ends_at_eta_min", "nonincreasing_until_total",
                    "symmetric_about_half_period")
@given(base=lrs, frac=st.floats(0.0, 0.9), total=st.integers(2, 300),
       form=st.sampled_from(["closed", "recursive"]))
def test_cosine_endpoints_monotone_and_symmetric(base, frac, total, form):
    """SGDR Eq. 5: base_lr at t = 0, eta_min at t = T, nonincreasing in between, and
    lr(T/2 + s) + lr(T/2 - s) = base_lr + eta_min."""
    eta_min = base * frac
    lr = cosine(steps(total + 1), base_lr=base, total_steps=total, eta_min=eta_min, form=form)
    # eta_min + (base - eta_min) * 1: the roundings of the difference and of the sum
    assert lr[0] == pytest.approx(base, rel=2 * U, abs=0)
    assert lr[total] == pytest.approx(eta_min, rel=0, abs=16 * EPS * total * base)
    if form == "closed":
        assert lr[total] == eta_min  # cos(pi) = -1 exactly: SGDR Eq. 5 ends at eta_min
    assert np.all(np.diff(lr) <= 8 * EPS * base)
    mirrored = lr + lr[::-1]  # lr(s) + lr(T - s) = base + eta_min
    np.testing.assert_allclose(mirrored, base + eta_min, rtol=0, atol=16 * EPS * total * base)


@pytest.mark.checks("hold_vs_periodic_past_end")
@given(base=lrs, total=st.integers(2, 100), extra=st.integers(1, 100))
def test_cosine_past_end_holds_or_follows_the_cosine(base, total, extra):
    """Past t = T: hold keeps eta_min (optax); periodic follows the cosine back up, lr(T + s) =
    lr(T - s) (torch CosineAnnealingLR)."""
    t = steps(total + extra + 1)
    held = cosine(t, base_lr=base, total_steps=total, eta_min=0.01 * base)
    assert np.all(held[total:] == 0.01 * base)
    # the recursion reaches eta_min exactly: its last ratio is (1 + cos(pi)) / (...) = 0
    held_rec = cosine(t, base_lr=base, total_steps=total, eta_min=0.01 * base, form="recursive")
    assert np.all(held_rec[total:] == 0.01 * base)
    periodic = cosine(t, base_lr=base, total_steps=total, eta_min=0.01 * base, past_end="periodic")
    s = np.arange(0, min(extra, total) + 1)
    np.testing.assert_allclose(periodic[total + s], periodic[total - s], rtol=0, atol=8 * EPS * base)
    rec = cosine(t, base_lr=base, total_steps=total, eta_min=0.01 * base, past_end="periodic",
                 form="recursive")
    assert rel(rec, periodic) <= 64 * EPS * (total + extra)


@pytest.mark.checks("starts_at_base_lr")  # after the warmup: lr(W) = base_lr
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


@pytest.mark.checks("power_1_is_linear", "power_2_is_square_of_linear_factor")
@given(base=lrs, frac=st.floats(0.0, 0.5), total=st.integers(1, 200), begin=st.integers(0, 20))
def test_polynomial_power_1_is_linear_and_power_2_is_its_square(base, frac, total, begin):
    """power 1: linear interpolation from base_lr to end_lr; power 2 (LARS' poly(2)):
    (lr - end) / (base - end) = (1 - t/T)^2, the square of the power-1 factor."""
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
    # Both powers scale the same float f = 1 - s/T.  Each factor recovered as (lr - end) /
    # (base - end) is within 5 U of f or f^2 (a product, a sum and its inversion, with
    # base - end >= base / 2); squaring doubles that and adds U, the square in the oracle adds U:
    # |r2 - r1^2| <= 17 U < 9 EPS.
    lin_factor = (lin - end) / (base - end)
    np.testing.assert_allclose((quad - end) / (base - end), lin_factor**2, rtol=0, atol=9 * EPS)


@pytest.mark.checks("endpoints", "held_before_transition_begin")
@given(base=lrs, frac=st.floats(0.0, 0.9), power=st.floats(0.25, 4.0), total=st.integers(1, 150),
       begin=st.integers(0, 20), form=st.sampled_from(["closed", "recursive"]))
def test_polynomial_endpoints_and_hold_before_begin(base, frac, power, total, begin, form):
    """lr(0) = base_lr, held until transition_begin; lr(t) = end_lr from t = begin + T on."""
    end = base * frac
    t = steps(begin + total + 10)
    lr = polynomial(t, base_lr=base, end_lr=end, power=power, total_steps=total,
                    transition_begin=begin, form=form)
    if form == "recursive":
        assert lr[0] == base  # the recursion starts from base_lr
    else:
        # (base - end) * 1**power + end: the rounding of base - end (U base) and of the sum
        assert abs(lr[0] - base) <= 2 * U * base
    np.testing.assert_array_equal(lr[: begin + 1], lr[0])  # s = clip(t - begin, 0, T) = 0
    # 1 - T/T = 0 exactly, and 0**power = 0: end_lr exactly (the recursion's last ratio is 0)
    assert np.all(lr[begin + total:] == end)


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


@st.composite
def one_cycle_any(draw, on_grid=False):
    """one_cycle hparams, pct_final included.  on_grid: pct_start = j / T and pct_final = m / T, so
    that the phase ends fall on integer steps (up to the rounding of (j / T) * T: tests check)."""
    total = draw(st.integers(8, 200))
    if on_grid:
        j = draw(st.integers(2, 45 * total // 100))
        m = draw(st.none() | st.integers(j + 1, total))
        pct_start, pct_final = j / total, None if m is None else m / total
    else:
        pct_start = draw(st.floats(0.05, 0.45))
        pct_final = draw(st.none() | st.floats(pct_start, 1.0))
    return {"max_lr": draw(lrs), "total_steps": total, "pct_start": pct_start,
            "pct_final": pct_final,
            "div_factor": draw(st.floats(2.0, 100.0)),
            "final_div_factor": draw(st.floats(1.0, 1e5)),
            "anneal": draw(st.sampled_from(["cos", "linear"])),
            "three_phase": draw(st.booleans()),
            "boundary": draw(st.sampled_from(["shifted", "truncated"]))}


def one_cycle_phases(hp):
    """The phase ends and (start value, end value) of each phase, as specs/schedules/one_cycle.toml
    defines them."""
    total, pct, max_lr = hp["total_steps"], hp["pct_start"], hp["max_lr"]
    second = 2 * pct if hp["pct_final"] is None else hp["pct_final"]
    initial = max_lr / hp["div_factor"]
    final = initial / hp["final_div_factor"]
    if hp["boundary"] == "shifted":  # torch: float(pct * T) - 1, float(pct_final * T) - 2, T - 1
        ends = [float(pct * total) - 1, float(second * total) - 2, float(total - 1)]
    else:  # optax: int(pct * T), int(pct_final * T), T
        ends = [float(int(pct * total)), float(int(second * total)), float(total)]
    if hp["three_phase"]:
        return ends, [(initial, max_lr), (max_lr, initial), (initial, final)]
    return [ends[0], ends[2]], [(initial, max_lr), (max_lr, final)]


def one_cycle_lr(hp):
    """one_cycle at t = 0, ..., T + 2; hparams that leave a phase empty are rejected (those are
    test_bad_hparams_name_the_argument's)."""
    try:
        return one_cycle(steps(hp["total_steps"] + 3), **hp)
    except ValueError as err:
        if "phases must have positive lengths" not in str(err):
            raise
        reject()


def exact_at_phase_end(hp):
    """Where a phase end is an integer step, the lr there is a phase value bit for bit when the
    formula multiplies the value difference by 0: shifted + cos (the phase that ends there, at
    cos(pi) + 1 = 0) or truncated + linear (the phase that starts there, at p = 0).  Otherwise one
    rounding of a difference of phase values (at most half an ulp of max_lr) survives."""
    return (hp["boundary"] == "shifted") == (hp["anneal"] == "cos")


@given(hp=one_cycle_any())
def test_starts_at_max_over_div_factor(hp):
    """lr(0) = max_lr / div_factor (torch's initial_lr, optax's peak_value / div_factor)."""
    lr = one_cycle_lr(hp)
    initial = hp["max_lr"] / hp["div_factor"]
    if hp["anneal"] == "linear":
        assert lr[0] == initial  # (max_lr - initial) * 0 + initial
    else:
        # max_lr + (initial - max_lr) / 2 * (cos(0) + 1): the rounding of initial - max_lr survives
        assert abs(lr[0] - initial) <= np.spacing(hp["max_lr"])


@given(hp=one_cycle_any(on_grid=True))
def test_peak_at_pct_start_boundary(hp):
    """max_lr at the end of phase 1 when it is an integer step (torch pct_start * T - 1, optax
    int(pct_start * T)); no step exceeds it."""
    (peak, *_), _ = one_cycle_phases(hp)
    assume(peak == int(peak))
    lr = one_cycle_lr(hp)
    max_lr = hp["max_lr"]
    if exact_at_phase_end(hp):
        assert lr[int(peak)] == max_lr
    else:
        assert abs(lr[int(peak)] - max_lr) <= np.spacing(max_lr)
    # each cos value is between its phase values up to the rounding of their difference
    assert np.max(lr) <= max_lr + np.spacing(max_lr)


@given(hp=one_cycle_any())
def test_final_lr_is_initial_over_final_div_factor(hp):
    """The cycle ends at max_lr / div_factor / final_div_factor: at t = T - 1 (torch's last phase
    end) or from t = T on (optax)."""
    lr = one_cycle_lr(hp)
    total = hp["total_steps"]
    final = hp["max_lr"] / hp["div_factor"] / hp["final_div_factor"]
    if hp["boundary"] == "truncated":
        assert np.all(lr[total:] == final)  # optax holds the final value
    elif hp["anneal"] == "cos":
        assert lr[total - 1] == final  # final + (v0 - final) / 2 * (cos(pi) + 1)
    else:
        # (final - v0) * 1 + v0 (v0 = max_lr or the initial lr): the rounding of final - v0,
        # half an ulp of v0, is not small next to final (torch computes the same)
        assert abs(lr[total - 1] - final) <= np.spacing(hp["max_lr"])


@given(hp=one_cycle_any(on_grid=True))
def test_three_phase_returns_to_initial(hp):
    """three_phase: phase 2 ends at the initial lr max_lr / div_factor (at pct_final * T - 2 in
    torch, int(pct_final * T) in optax; pct_final defaults to 2 pct_start)."""
    hp = {**hp, "three_phase": True}
    (_, back, _), _ = one_cycle_phases(hp)
    assume(back == int(back))
    lr = one_cycle_lr(hp)
    initial = hp["max_lr"] / hp["div_factor"]
    if exact_at_phase_end(hp):
        assert lr[int(back)] == initial
    else:
        assert abs(lr[int(back)] - initial) <= np.spacing(hp["max_lr"])


@given(hp=one_cycle_any())
def test_linear_phases_are_linear(hp):
    """anneal="linear": within each phase from (a, v0) to (b, v1) the lr is the line
    v0 + (v1 - v0) (t - a) / (b - a), checked against exact rationals at every step t < T."""
    hp = {**hp, "anneal": "linear"}
    lr = one_cycle_lr(hp)
    ends, values = one_cycle_phases(hp)
    starts = [0.0, *ends[:-1]]
    for step in range(hp["total_steps"]):  # from T on: extrapolated (torch) or held (optax)
        if hp["boundary"] == "shifted":  # the first phase whose end the step does not pass
            i = next(k for k, end in enumerate(ends) if step <= end)
        else:  # a <= t < b
            i = next(k for k, (a, b) in enumerate(zip(starts, ends, strict=True)) if a <= step < b)
        a, b = Fraction(starts[i]), Fraction(ends[i])
        v0, v1 = (Fraction(v) for v in values[i])
        line = v0 + (v1 - v0) * (step - a) / (b - a)
        # p = (t - a) / (b - a) carries 3 U, (v1 - v0) p two more, all scaled by
        # |v1 - v0| p <= max_lr; + v0 rounds once more: 6 U max_lr
        assert abs(Fraction(lr[step]) - line) <= 6 * Fraction(U) * Fraction(hp["max_lr"])


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


# form = "recursive" (torch's chainable schedulers) against the closed forms.  Each strategy draws
# hparams and steps t and gives the bound on |recursive - closed| at each step, from float64
# rounding: U per rounded operation, the operations counted from the oracle's code.


@st.composite
def step_decay_forms(draw):
    hp = {"base_lr": draw(lrs), "gamma": draw(st.floats(0.05, 1.0)),
          "step_size": draw(st.integers(1, 12)),
          "milestones": draw(st.none() | st.lists(st.integers(0, 120), min_size=1, max_size=8)
                             .map(tuple))}
    t = steps(150)
    marks = hp["milestones"]
    count = (np.floor(t / hp["step_size"]) if marks is None
             else np.sum([t >= m for m in marks], axis=0))
    # recursive: a power gamma**times (< 1 ulp, 2 U) and a product (U) per boundary passed;
    # closed: base * gamma**count, one power and one product
    return hp, t, (3 * count + 3) * U * step_decay(t, **hp)


@st.composite
def linear_warmup_forms(draw):
    peak, w = draw(lrs), draw(st.integers(1, 100))
    hp = {"peak_lr": peak, "init_lr": peak / draw(st.floats(1.0, 64.0)), "warmup_steps": w}
    t = steps(w + 10)
    # recursive: the factor 1 + (1 - s) / (W s + (i - 1)(1 - s)) carries 6 U and the product one
    # more, relative, per step; the factors telescope, so the rounding of s = init / peak only
    # moves lr_0 = peak * s (2 U); closed: init + (peak - init) t / W, 4 U of peak
    return hp, t, (7 * np.minimum(t, w) + 6) * U * peak


@st.composite
def polynomial_forms(draw):
    base, total, begin = draw(lrs), draw(st.integers(1, 150)), draw(st.integers(0, 20))
    power = draw(st.floats(0.25, 4.0))
    hp = {"base_lr": base, "end_lr": base * draw(st.floats(0.0, 0.9)), "power": power,
          "total_steps": total, "transition_begin": begin}
    t = steps(begin + total + 10)
    decay_steps = np.clip(t - begin, 0, total)
    # the ratio of step i is f_i / f_(i-1) with f_i = 1 - i/T the same float the closed form
    # raises to the power, so the ratios telescope exactly; per step the quotient's rounding
    # raised to the power (power U), the power (2 U), the subtraction of end_lr, the product and
    # the sum (3 U), all on values <= base_lr; the closed form adds 5 U of base_lr
    return hp, t, (decay_steps * (power + 5) + 5) * U * base


@st.composite
def cosine_forms(draw):
    base, span, w = draw(lrs), draw(st.integers(1, 150)), draw(st.integers(0, 20))
    past_end = draw(st.sampled_from(["hold", "periodic"]))
    # periodic with exponent > 1 is left out: see below
    exponent = draw(st.floats(0.25, 1.0) if past_end == "periodic" else st.floats(0.25, 3.0))
    hp = {"base_lr": base, "eta_min": base * draw(st.floats(0.0, 0.9)), "exponent": exponent,
          "total_steps": w + span, "warmup_steps": w, "warmup_init_lr": draw(small_lrs),
          "past_end": past_end}
    t = steps(w + span + draw(st.integers(0, 2 * span)) + 1)
    s = t - w  # the warmup is the same expression in both forms
    cos_steps = np.clip(s, 0, span if past_end == "hold" else None)
    # As for polynomial, 1 + cos(pi e / D) is the same float in the numerator of step e and the
    # denominator of step e + 1 (and the closed form's, up to numpy's cos against math.cos, 2 U):
    # (exponent + 5) U of base_lr per step.  The closed form: 6 U of base_lr, and the two cosines'
    # difference scaled by exponent x^(exponent - 1) for x = (1 + cos) / 2 >= sin^2(pi / 2D) >= 1/D^2.
    cond = max(1.0, span ** (2 * (1 - exponent)))
    bound = cos_steps * (exponent + 5) + (exponent + 6) * cond
    # periodic, past T: the ratios exceed 1 and carry the relative error of the restart value
    # eta_min + (base - eta_min) ((1 - cos(pi / D)) / 2)^exponent forward; its absolute rounding
    # (a few U of base_lr: the cosine near 1, the sum with eta_min) is relative to a value
    # >= (base - eta_min) / D^(2 exponent), at most D^2 times larger for exponent <= 1.  With
    # exponent > 1 the amplification grows as D^(2 exponent) and the difference is no longer
    # rounding-sized (base_lr = 1, eta_min = 0.5, D = 100, exponent = 3: at t = 200 the closed
    # form gives 1.0, the recursion 0.99999957), so that corner is not drawn.
    bound = bound + np.where(s > span, (4 * exponent + 4) * span**2, 0.0)
    return hp, t, bound * U * base


RECURSIVE_FORMS = {"step_decay": step_decay_forms(), "linear_warmup": linear_warmup_forms(),
                   "polynomial": polynomial_forms(), "cosine": cosine_forms()}


@pytest.mark.parametrize("name", [name for name in SCHEDULES if "recursive_equals_closed_to_rounding"
                                  in reference.get(name).spec.properties])
@given(data=st.data())
def test_recursive_equals_closed_to_rounding(name, data):
    """Every schedule that lists the property: form="recursive" (torch's per-step updates) equals
    the closed formula up to the rounding the recursion accumulates, one step at a time."""
    assert name in RECURSIVE_FORMS, f"{name} lists the property: give it a strategy here"
    hp, t, bound = data.draw(RECURSIVE_FORMS[name])
    fn = reference.get(name).function
    closed, recursive = fn(t, **hp, form="closed"), fn(t, **hp, form="recursive")
    assert np.all(np.abs(recursive - closed) <= bound), float(np.max(np.abs(recursive - closed) / bound))


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
    assert set(mapping.MAPPINGS) == set(SCHEDULES)
    for name in SCHEDULES:
        assert mapping.MAPPINGS[name].dialect == reference.get(name).spec.dialects[fw]["hparams"]
        assert mapping.MAPPINGS[name].api


@pytest.mark.parametrize(("fw", "module"), _frameworks())
@pytest.mark.parametrize(("name", "case_name"), CASES)
def test_cases_match_framework(fw, module, name, case_name):
    """Each spec case under the framework's dialect: torch's recursion bit for bit; closed forms
    (torch step(epoch), optax) to a few ulp of the schedule's scale."""
    from conformance.adapters import Unsupported

    mapping = _mapping(module)
    op = reference.get(name)
    case = next(c for c in op.spec.cases if c["name"] == case_name)
    hp = op.spec.resolve({**mapping.MAPPINGS[name].dialect, **case["overrides"]})
    t = steps(case["shapes"]["t"][0])
    forms = [hp["form"], "closed"] if fw == "torch" and "form" in hp else [hp.get("form")]
    checked = 0
    for form in dict.fromkeys(forms):
        run = dict(hp) if form is None else {**hp, "form": form}
        ref = op.apply({"t": t}, None, **run)[0]["lr"]
        try:
            got = mapping.MAPPINGS[name].fn(t, run)
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
    run = reference.get(name).spec.resolve({**mapping.MAPPINGS[name].dialect, **hp})
    np.testing.assert_array_equal(mapping.MAPPINGS[name].fn(t, run),
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
        got = optax_map.MAPPINGS["polynomial"].fn(t, hp)
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
        torch_map.MAPPINGS["cosine"].fn(t, cos)
    with pytest.raises(Unsupported, match="holds its end value"):
        optax_map.MAPPINGS["cosine"].fn(t, {**cos, "form": "closed", "past_end": "periodic"})
    oc = reference.get("one_cycle").spec.resolve({"total_steps": 20})
    with pytest.raises(Unsupported, match="raises past total_steps"):
        torch_map.MAPPINGS["one_cycle"].fn(t, oc)
    with pytest.raises(Unsupported, match="does not implement"):
        torch_map.MAPPINGS["polynomial"].fn(t, {**reference.get("polynomial").spec.defaults(),
                                              "form": "recursive", "new_knob": 1})
    with pytest.raises(Unsupported, match="start_factor"):
        torch_map.MAPPINGS["linear_warmup"].fn(t, {**reference.get("linear_warmup").spec.defaults(),
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


# Bad step counts, bad hyper-parameters and integer arrays are the specs' [[error_cases]]
# (tests/test_error_cases.py); what stays here is what that format cannot express.


def test_lists_of_integers_are_accepted():
    # a list through the human API is promoted; an int64 array is refused (cosine's t_int64)
    np.testing.assert_array_equal(cosine([0, 100], total_steps=100), [0.1, 0.0])


def test_unknown_keyword_is_refused_by_the_function_itself():
    # the human API's own signature: the format calls op.apply, whose spec.resolve refuses an
    # unknown hyper-parameter before the function is reached (with another message)
    with pytest.raises(TypeError, match="unexpected keyword argument 'lr'"):
        polynomial(steps(10), lr=0.1)
