"""Learning-rate schedules and batch-size rules: pure functions of the step count.

Every schedule is an ordinary op (family ``schedules``)::

    lr = name(t, *, <hyper-parameters>)

``t`` holds step counts 0, 1, 2, ... (any shape; float arrays of integer values): the value an
optimizer uses at its step t+1, i.e. torch's scheduler ``last_epoch`` after t calls of
``scheduler.step()`` and optax's ``count`` before the update.  ``lr`` has the shape of t.  A
step count is not differentiable: the specs say ``backward = "none"`` and there is no VJP.

Schedules (``specs/schedules/<name>.toml`` cites the equations):

* :func:`linear_warmup` -- Goyal et al. (arXiv:1706.02677) Sec. 2.2 gradual warmup:
  ``eta_i = eta_base + (k eta - eta_base) i / W`` for ``i < W``, then ``k eta`` (constant).
* :func:`step_decay` -- ``base_lr * gamma^n(t)``, n = ``floor(t / step_size)`` (torch StepLR,
  optax ``exponential_decay(staircase=True)``) or the number of milestones ``<= t`` (torch
  MultiStepLR, optax ``piecewise_constant_schedule``).
* :func:`cosine` -- SGDR's annealing (Loshchilov & Hutter, arXiv:1608.03983, Eq. 5)
  ``eta_min + (eta_max - eta_min) (1 + cos(pi t / T)) / 2``, optionally raised to optax's
  ``exponent`` and preceded by a linear warmup (optax ``warmup_cosine_decay_schedule``).
* :func:`polynomial` -- ``end + (base - end) (1 - t / T)^power`` (power 2 in You et al.,
  arXiv:1708.03888; torch PolynomialLR; optax ``polynomial_schedule``).
* :func:`one_cycle` -- Smith & Topin's 1cycle (arXiv:1708.07120) as torch's OneCycleLR and
  optax's ``cosine_onecycle_schedule`` / ``linear_onecycle_schedule`` compute it.

Batch-size rules (plain helpers, not ops): :func:`linear_scaling_rule` (Goyal et al. Sec. 2.1,
``eta = 0.1 kn / 256``) and :func:`sqrt_scaling_rule` (Hoffer et al., arXiv:1705.08741,
``eta sqrt(B / B_small)``).

Conventions (knobs with ``allowed`` lists in the specs):

* ``form``: ``"closed"`` evaluates the formula at t; ``"recursive"`` reproduces torch's
  *chainable* schedulers bit for bit: torch updates the optimizer's current lr once per
  ``scheduler.step()`` (StepLR/MultiStepLR multiply by gamma at each boundary; LinearLR,
  PolynomialLR and CosineAnnealingLR multiply by the ratio of consecutive closed-form factors),
  computed in Python floats.  In exact arithmetic both forms are equal; in float64 the recursion
  accumulates one rounding per step (relative differences of order t * 1e-16, more where the
  cosine ratio divides two small numbers near t = T).  The recursion costs O(max t) Python steps.
* ``past_end`` (cosine): past t = T optax holds ``eta_min``; torch's CosineAnnealingLR keeps
  following the cosine, which rises again (period 2T).
* ``boundary`` (one_cycle): torch ends phase 1 at the real step ``pct_start * T - 1`` and the
  last phase at ``T - 1`` (and extrapolates its formula at t = T); optax ends phase 1 at
  ``int(pct_start * T)`` and the cycle at ``T``, holding the final value from then on.

Evaluation.  The closed forms are evaluated as the papers and every framework write them (e.g.
``1 + cos(pi t / T)`` rather than the cancellation-free ``2 cos^2(pi t / 2T)``): near the end of a
cosine the cancellation costs relative accuracy in the small values, and the harness's
same-algorithm baseline (the same formula in float32) carries that cancellation into the bound
instead of failing frameworks for it.  Scalar constants (``max_lr / div_factor``, the phase
boundaries of one_cycle) are formed in Python floats with the frameworks' operation order.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from reference._backend import device, is_array, namespace
from reference.registry import oracle_function

__all__ = [
    "cosine",
    "linear_scaling_rule",
    "linear_warmup",
    "one_cycle",
    "polynomial",
    "sqrt_scaling_rule",
    "step_decay",
]


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _steps(op: str, t: Any) -> int:
    """Check that ``t`` holds step counts 0, 1, 2, ...; return the largest (0 when empty)."""
    xp = namespace(t)
    if math.prod(int(s) for s in t.shape) == 0:
        return 0
    if not bool(xp.all(xp.isfinite(t))):
        raise ValueError(f"{op}: t must hold finite step counts, got a NaN or an infinity")
    low = float(xp.min(t))
    if low < 0:
        raise ValueError(f"{op}: t must hold non-negative step counts (0, 1, 2, ...), got {low!r}")
    if not bool(xp.all(t == xp.floor(t))):
        bad = float(xp.max(xp.where(t == xp.floor(t), -1.0, t)))
        raise ValueError(f"{op}: t must hold integer step counts (0, 1, 2, ...), got {bad!r}")
    return int(float(xp.max(t)))


def _table(t: Any, values: Sequence[float], index: Any | None = None) -> Any:
    """``values[index]`` elementwise (``index`` defaults to t), in t's namespace, shape and dtype."""
    xp = namespace(t)
    idx = t if index is None else index
    flat = xp.reshape(xp.astype(idx, xp.int64), (-1,))
    table = xp.asarray(list(values), dtype=t.dtype, device=device(t))
    return xp.reshape(xp.take(table, flat), t.shape)


# --------------------------------------------------------------------------------------------
# Linear warmup (Goyal et al. Sec. 2.2)
# --------------------------------------------------------------------------------------------


@oracle_function("linear_warmup")
def linear_warmup(
    t: Any,
    *,
    peak_lr: float = 3.2,
    init_lr: float = 0.1,
    warmup_steps: int = 5,
    form: str = "closed",
) -> Any:
    """Gradual warmup: ``init_lr + (peak_lr - init_lr) t / W`` for ``t < W``, then ``peak_lr``.

    Goyal et al.'s eta_base is ``init_lr`` and k eta is ``peak_lr``; with k = 1 (``init_lr ==
    peak_lr``) the warmup is constant.  ``form = "recursive"`` is torch's LinearLR with
    ``start_factor = init_lr / peak_lr`` and ``end_factor = 1`` on an optimizer of lr
    ``peak_lr``: ``lr_0 = peak_lr * s``, ``lr_i = lr_{i-1} (1 + (1 - s) / (W s + (i - 1)(1 - s)))``
    for ``1 <= i <= W``, unchanged afterwards.  From ``init_lr = 0`` the multiplicative
    recursion is undefined (torch refuses ``start_factor = 0``): the closed form is used.
    """
    op = "linear_warmup"
    n = _steps(op, t)
    if form == "recursive" and init_lr > 0:
        s = init_lr / peak_lr
        values = [peak_lr * s]
        for i in range(1, min(n, warmup_steps) + 1):
            values.append(values[-1] * (1.0 + (1.0 - s) / (warmup_steps * s + (i - 1) * (1.0 - s))))
        xp = namespace(t)
        return _table(t, values, xp.clip(t, 0.0, float(len(values) - 1)))
    xp = namespace(t)
    ramp = init_lr + (peak_lr - init_lr) * t / warmup_steps  # Goyal Sec. 2.2
    return xp.where(t < warmup_steps, ramp, peak_lr)




# --------------------------------------------------------------------------------------------
# Step decay (StepLR / MultiStepLR / piecewise constant)
# --------------------------------------------------------------------------------------------


def _milestones(op: str, milestones: Sequence[int] | None) -> list[int] | None:
    if milestones is None:
        return None
    out = [int(m) for m in milestones]
    if any(m < 0 for m in out):
        raise ValueError(f"{op}: hyper-parameter 'milestones' must hold step counts >= 0, got "
                         f"{tuple(out)}")
    return out


@oracle_function("step_decay")
def step_decay(
    t: Any,
    *,
    base_lr: float = 0.1,
    gamma: float = 0.1,
    step_size: int = 30,
    milestones: tuple[int, ...] | None = None,
    form: str = "closed",
) -> Any:
    """``base_lr * gamma^n(t)``: n = ``floor(t / step_size)``, or with ``milestones`` the number
    of milestones ``m <= t`` (a repeated milestone counts each time, as in torch's MultiStepLR;
    ``step_size`` is then unused).

    ``form = "recursive"``: the lr is multiplied by gamma at each boundary in turn (torch's
    StepLR/MultiStepLR ``group["lr"] * gamma``, ``* gamma ** count`` at a repeated milestone;
    optax's ``piecewise_constant_schedule`` multiplies the same way).
    """
    op = "step_decay"
    n = _steps(op, t)
    marks = _milestones(op, milestones)
    xp = namespace(t)
    if marks is None:
        count = xp.floor(t / step_size)
        if form == "recursive":
            values = [base_lr]
            for _ in range(n // step_size):
                values.append(values[-1] * gamma)
            return _table(t, values, count)
        return base_lr * gamma**count
    if form == "recursive":
        values = [base_lr]
        index = xp.zeros_like(t)
        for m, times in sorted(Counter(marks).items()):
            values.append(values[-1] * gamma**times)
            index = index + xp.astype(t >= m, t.dtype)
        return _table(t, values, index)
    count = xp.zeros_like(t)
    for m in marks:
        count = count + xp.astype(t >= m, t.dtype)
    return base_lr * gamma**count




# --------------------------------------------------------------------------------------------
# Cosine annealing (SGDR Eq. 5), with optax's exponent and warmup
# --------------------------------------------------------------------------------------------


def _cosine_recursion(n: int, base: float, eta_min: float, period: int,
                      exponent: float) -> list[float]:
    """torch's CosineAnnealingLR.get_lr for last_epoch = 0..n (Python floats, its operation
    order); with ``exponent != 1`` each factor ratio is raised to it (the same recursion for
    ``eta_min + (base - eta_min) c^exponent``, which torch does not have)."""
    values = [base]
    for e in range(1, n + 1):
        lr = values[-1]
        if (e - 1 - period) % (2 * period) == 0:
            if exponent == 1.0:
                values.append(lr + (base - eta_min) * (1 - math.cos(math.pi / period)) / 2)
            else:
                values.append(lr + (base - eta_min) * ((1 - math.cos(math.pi / period)) / 2)
                              ** exponent)
        else:
            ratio = ((1 + math.cos(math.pi * e / period))
                     / (1 + math.cos(math.pi * (e - 1) / period)))
            values.append((ratio if exponent == 1.0 else ratio**exponent) * (lr - eta_min)
                          + eta_min)
    return values


@oracle_function("cosine")
def cosine(
    t: Any,
    *,
    base_lr: float = 0.1,
    total_steps: int = 100,
    eta_min: float = 0.0,
    exponent: float = 1.0,
    warmup_steps: int = 0,
    warmup_init_lr: float = 0.0,
    past_end: str = "hold",
    form: str = "closed",
) -> Any:
    """Cosine annealing from ``base_lr`` to ``eta_min`` over ``total_steps`` (after the warmup).

    With ``W = warmup_steps``, ``D = total_steps - W`` and ``s = t - W``::

        t < W:   warmup_init_lr + (base_lr - warmup_init_lr) t / W
        t >= W:  eta_min + (base_lr - eta_min) ((1 + cos(pi s / D)) / 2) ** exponent

    where ``s`` is clipped to ``D`` with ``past_end = "hold"`` and not with ``"periodic"``.
    ``total_steps`` counts the warmup, as optax's ``decay_steps`` does.  ``form = "recursive"``:
    for ``s >= 0`` torch's CosineAnnealingLR recursion (``T_max = D``) started at ``base_lr``
    (with ``exponent != 1`` each step's factor ratio raised to the exponent).
    """
    op = "cosine"
    n = _steps(op, t)
    if total_steps <= warmup_steps:
        raise ValueError(f"{op}: hyper-parameter 'total_steps' must exceed warmup_steps "
                         f"({warmup_steps}): it counts the warmup, got {total_steps}")
    xp = namespace(t)
    span = total_steps - warmup_steps
    s = t - warmup_steps
    if form == "recursive":
        last = n - warmup_steps if past_end == "periodic" else min(n - warmup_steps, span)
        values = _cosine_recursion(max(last, 0), base_lr, eta_min, span, exponent)
        decayed = _table(t, values, xp.clip(s, 0.0, float(len(values) - 1)))
    else:
        if past_end == "hold":
            s = xp.clip(s, None, float(span))
        factor = (1 + xp.cos(xp.pi * s / span)) / 2  # SGDR Eq. 5
        decayed = eta_min + (base_lr - eta_min) * factor**exponent
    if warmup_steps == 0:
        return decayed
    ramp = warmup_init_lr + (base_lr - warmup_init_lr) * t / warmup_steps
    return xp.where(t < warmup_steps, ramp, decayed)




# --------------------------------------------------------------------------------------------
# Polynomial decay (LARS poly(2), torch PolynomialLR, optax polynomial_schedule)
# --------------------------------------------------------------------------------------------


@oracle_function("polynomial")
def polynomial(
    t: Any,
    *,
    base_lr: float = 0.1,
    end_lr: float = 0.0,
    power: float = 2.0,
    total_steps: int = 100,
    transition_begin: int = 0,
    form: str = "closed",
) -> Any:
    """``end_lr + (base_lr - end_lr) (1 - s / T)^power`` with ``s = clip(t - begin, 0, T)``.

    ``form = "recursive"``: torch's PolynomialLR recursion ``lr_i = lr_{i-1} ((1 - i/T) /
    (1 - (i-1)/T))^power`` for ``1 <= i <= T`` (from ``base_lr``; unchanged afterwards), applied
    to ``lr - end_lr`` (torch has no end value: with ``end_lr = 0`` the operations are torch's).
    """
    op = "polynomial"
    n = _steps(op, t)
    xp = namespace(t)
    s = xp.clip(t - transition_begin, 0.0, float(total_steps))
    if form == "recursive":
        values = [base_lr]
        for i in range(1, min(max(n - transition_begin, 0), total_steps) + 1):
            ratio = (1.0 - i / total_steps) / (1.0 - (i - 1) / total_steps)
            values.append((values[-1] - end_lr) * ratio**power + end_lr)
        return _table(t, values, xp.clip(s, None, float(len(values) - 1)))
    frac = 1 - s / total_steps
    return (base_lr - end_lr) * frac**power + end_lr




# --------------------------------------------------------------------------------------------
# One cycle (torch OneCycleLR, optax cosine_onecycle_schedule / linear_onecycle_schedule)
# --------------------------------------------------------------------------------------------


def _one_cycle_phases(
    op: str, total_steps: int, pct_start: float, pct_final: float | None, three_phase: bool,
    boundary: str, max_lr: float, div_factor: float, final_div_factor: float,
) -> tuple[list[float], list[tuple[float, float]]]:
    """Phase ends (real step positions) and (start value, end value) of each phase."""
    initial = max_lr / div_factor
    final = initial / final_div_factor
    if three_phase:
        second = 2 * pct_start if pct_final is None else pct_final
        values = [(initial, max_lr), (max_lr, initial), (initial, final)]
    else:
        values = [(initial, max_lr), (max_lr, final)]
    if boundary == "shifted":  # torch: float(pct * T) - 1, float(2 pct * T) - 2, T - 1
        ends = [float(pct_start * total_steps) - 1]
        if three_phase:
            ends.append(float(second * total_steps) - 2)
        ends.append(float(total_steps - 1))
    else:  # optax: int(pct * T), int(pct_final * T), T
        ends = [float(int(pct_start * total_steps))]
        if three_phase:
            ends.append(float(int(second * total_steps)))
        ends.append(float(total_steps))
    starts = [0.0, *ends[:-1]]
    if any(not end > start for start, end in zip(starts, ends, strict=True)):
        raise ValueError(
            f"{op}: the phases must have positive lengths; total_steps={total_steps}, "
            f"pct_start={pct_start}" + (f", pct_final={pct_final}" if three_phase else "")
            + f" give phase ends {ends} with boundary={boundary!r}")
    return ends, values


@oracle_function("one_cycle")
def one_cycle(
    t: Any,
    *,
    max_lr: float = 0.1,
    total_steps: int = 100,
    pct_start: float = 0.3,
    pct_final: float | None = None,
    anneal: str = "cos",
    three_phase: bool = False,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    boundary: str = "shifted",
) -> Any:
    """The 1cycle policy: ``max_lr / div_factor`` up to ``max_lr``, then down to
    ``max_lr / div_factor / final_div_factor`` (three_phase: back to the initial value first,
    at ``pct_final``, default ``2 pct_start``, then down to the final value; ``pct_final`` is
    unused with two phases).

    In a phase from position ``a`` (value ``v0``) to ``b`` (value ``v1``) with ``p = (t - a) /
    (b - a)``: ``cos``: ``v1 + (v0 - v1) / 2 (cos(pi p) + 1)``; ``linear``: ``(v1 - v0) p + v0``.
    ``boundary = "shifted"`` (torch): ends at ``pct_start * T - 1`` (a real number), ``pct_final
    * T - 2`` and ``T - 1``; a step belongs to the first phase whose end it does not pass and the
    last phase's formula continues past its end.  ``"truncated"`` (optax): ends at
    ``int(pct_start * T)``, ``int(pct_final * T)`` and ``T``; phase i holds ``a <= t < b``; the
    final value from ``t >= T`` on.
    """
    op = "one_cycle"
    _steps(op, t)
    ends, values = _one_cycle_phases(op, total_steps, pct_start, pct_final, three_phase, boundary,
                                     max_lr, div_factor, final_div_factor)
    xp = namespace(t)
    starts = [0.0, *ends[:-1]]

    def anneal_phase(i: int) -> Any:
        v0, v1 = values[i]
        pct = (t - starts[i]) / (ends[i] - starts[i])
        if anneal == "cos":
            return v1 + (v0 - v1) / 2.0 * (xp.cos(xp.pi * pct) + 1)
        return (v1 - v0) * pct + v0

    last = len(ends) - 1
    if boundary == "shifted":
        lr = anneal_phase(last)
        for i in reversed(range(last)):
            lr = xp.where(t <= ends[i], anneal_phase(i), lr)
        return lr
    lr = xp.where(t >= ends[last], values[last][1], 0.0 * t)
    for i in range(last + 1):
        lr = xp.where((t >= starts[i]) & (t < ends[i]), anneal_phase(i), lr)
    return lr




# --------------------------------------------------------------------------------------------
# Batch-size rules (helpers)
# --------------------------------------------------------------------------------------------


def _positive(op: str, name: str, value: Any, *, allow_zero: bool = False) -> None:
    """``value`` (a number or an array) must be finite and > 0 (>= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or is_array(value)):
        raise TypeError(f"{op}: {name} must be a number or an array, got {type(value).__name__}")
    if is_array(value):
        xp = namespace(value)
        finite = bool(xp.all(xp.isfinite(value)))
        low = float(xp.min(value)) if finite else math.nan
    else:
        low = float(value)
    if not math.isfinite(low) or (low < 0 if allow_zero else low <= 0):
        want = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{op}: {name} must be finite and {want}, got {value!r}")


def linear_scaling_rule(batch: Any, base_lr: float = 0.1, base_batch: float = 256) -> Any:
    """Goyal et al. Sec. 2.1: "multiply the learning rate by k when the minibatch is multiplied
    by k": ``base_lr * batch / base_batch`` (their ``eta = 0.1 kn / 256``)."""
    op = "linear_scaling_rule"
    _positive(op, "batch", batch)
    _positive(op, "base_lr", base_lr, allow_zero=True)
    _positive(op, "base_batch", base_batch)
    return base_lr * batch / base_batch


def sqrt_scaling_rule(batch: Any, base_lr: float = 0.1, base_batch: float = 128) -> Any:
    """Hoffer et al. (``--lr_bb_fix`` of their main_gbn.py: ``lr0 * (batch_size /
    mini_batch_size) ** 0.5``): ``base_lr * sqrt(batch / base_batch)``, which keeps the
    covariance of the weight update fixed as the batch grows.  ``base_batch`` is the small
    (ghost) batch the base rate was tuned for, 128 in their code."""
    op = "sqrt_scaling_rule"
    _positive(op, "batch", batch)
    _positive(op, "base_lr", base_lr, allow_zero=True)
    _positive(op, "base_batch", base_batch)
    ratio = batch / base_batch
    if isinstance(ratio, (int, float)):
        return base_lr * math.sqrt(ratio)
    return base_lr * namespace(ratio).sqrt(ratio)
