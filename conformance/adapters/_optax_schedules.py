"""optax schedules: one mapping per schedule op (family ``schedules``).

``MAPPINGS[op].fn(t, hparams) -> lr``: ``t`` is a NumPy array of step counts, ``hparams`` the full
hyper-parameter dict of the request; the result is a float64 NumPy array of t's shape.  Each
mapping builds the optax schedule a user would write and evaluates it at each count of
``jnp.asarray(t, float64)``: ``jax.jit(jax.vmap(schedule))``, scalar counts as optax's state
passes them, jitted as in a train step (XLA's rewrites included: see the polynomial note in
tests/test_opt_schedules.py).  That needs ``jax_enable_x64`` (the jax adapter enables it when it
is created; without it the mapping raises :class:`Unsupported` rather than compute in float32).

optax has one API per form: ``piecewise_constant_schedule`` multiplies by the scale at each
boundary in turn (``form = "recursive"``), ``exponential_decay(staircase=True)`` is the closed
form of periodic step decay; every other optax schedule is a closed form.  Hyper-parameter values
optax cannot express raise :class:`Unsupported`; every hyper-parameter must be read.

``MAPPINGS[op].dialect``: the convention knobs optax follows (the specs' ``[dialects.optax]``);
``MAPPINGS[op].api``: the optax call; ``dtypes`` float64 only (schedules are host-side floats).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from conformance.adapters import HyperParameters, Unsupported
from conformance.adapters.mapping import Mapping

__all__ = ["MAPPINGS"]


def _hparams(op: str, hparams: dict[str, Any]) -> HyperParameters:
    return HyperParameters(hparams, op=op, framework="optax")


def _evaluate(schedule: Callable[[Any], Any], t: np.ndarray) -> np.ndarray:
    if not jax.config.read("jax_enable_x64"):
        raise Unsupported("optax schedules in float64 need jax_enable_x64")
    t = np.asarray(t, dtype=np.float64)
    # optax schedules take one scalar count (piecewise_interpolate_schedule needs one): vmap
    out = jax.jit(jax.vmap(schedule))(jnp.asarray(t.reshape(-1), dtype=jnp.float64))
    return np.broadcast_to(np.asarray(out, dtype=np.float64), (t.size,)).reshape(t.shape).copy()


def _last(t: np.ndarray) -> int:
    t = np.asarray(t, dtype=np.float64)
    return int(t.max()) if t.size else 0


def _linear_warmup(t: np.ndarray, hparams: dict[str, Any]) -> np.ndarray:
    hp = _hparams("linear_warmup", hparams)
    peak, init, steps = hp.take("peak_lr"), hp.take("init_lr"), hp.take("warmup_steps")
    hp.expect("form", "closed", why="linear_schedule is a closed form")
    hp.check_all_read()
    return _evaluate(optax.linear_schedule(init_value=init, end_value=peak,
                                           transition_steps=steps), t)


def _step_decay(t: np.ndarray, hparams: dict[str, Any]) -> np.ndarray:
    hp = _hparams("step_decay", hparams)
    base, gamma, size, marks = (hp.take("base_lr"), hp.take("gamma"), hp.take("step_size"),
                                hp.take("milestones"))
    form = hp.take("form")
    hp.check_all_read()
    if form == "closed":
        if marks is not None:
            raise Unsupported("optax has no closed-form milestones schedule "
                              "(piecewise_constant_schedule multiplies recursively)")
        if gamma == 0.0:
            raise Unsupported("optax exponential_decay returns a constant for decay_rate 0")
        return _evaluate(optax.exponential_decay(init_value=base, transition_steps=size,
                                                 decay_rate=gamma, staircase=True), t)
    if marks is None:
        marks = [size * k for k in range(1, _last(t) // size + 1)]
    # a milestone given `count` times is one boundary with scale gamma ** count (torch's product)
    scales = {int(m): gamma**count for m, count in Counter(marks).items()}
    return _evaluate(optax.piecewise_constant_schedule(base, scales or None), t)


def _cosine(t: np.ndarray, hparams: dict[str, Any]) -> np.ndarray:
    hp = _hparams("cosine", hparams)
    base, total, eta_min = hp.take("base_lr"), hp.take("total_steps"), hp.take("eta_min")
    exponent, warmup, warmup_init = (hp.take("exponent"), hp.take("warmup_steps"),
                                     hp.take("warmup_init_lr"))
    past_end = hp.take("past_end")
    hp.expect("form", "closed", why="optax schedules are closed forms")
    hp.check_all_read()
    if past_end != "hold" and _last(t) > total:
        raise Unsupported("optax cosine_decay_schedule holds its end value past decay_steps "
                          "(past_end='hold')")
    if warmup > 0:
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=warmup_init, peak_value=base, warmup_steps=warmup, decay_steps=total,
            end_value=eta_min, exponent=exponent)
    else:
        alpha = 0.0 if base == 0.0 else eta_min / base
        schedule = optax.cosine_decay_schedule(init_value=base, decay_steps=total, alpha=alpha,
                                               exponent=exponent)
    return _evaluate(schedule, t)


def _polynomial(t: np.ndarray, hparams: dict[str, Any]) -> np.ndarray:
    hp = _hparams("polynomial", hparams)
    schedule = optax.polynomial_schedule(
        init_value=hp.take("base_lr"), end_value=hp.take("end_lr"), power=hp.take("power"),
        transition_steps=hp.take("total_steps"), transition_begin=hp.take("transition_begin"))
    hp.expect("form", "closed", why="polynomial_schedule is a closed form")
    hp.check_all_read()
    return _evaluate(schedule, t)


def _one_cycle(t: np.ndarray, hparams: dict[str, Any]) -> np.ndarray:
    hp = _hparams("one_cycle", hparams)
    max_lr, total, pct = hp.take("max_lr"), hp.take("total_steps"), hp.take("pct_start")
    pct_final, anneal, three = hp.take("pct_final"), hp.take("anneal"), hp.take("three_phase")
    div, final_div = hp.take("div_factor"), hp.take("final_div_factor")
    hp.expect("boundary", "truncated", why="optax ends phase 1 at int(pct_start * T)")
    hp.check_all_read()
    if anneal == "cos" and not three:
        schedule = optax.cosine_onecycle_schedule(
            transition_steps=total, peak_value=max_lr, pct_start=pct, div_factor=div,
            final_div_factor=final_div)
    elif anneal == "linear" and three:
        schedule = optax.linear_onecycle_schedule(
            transition_steps=total, peak_value=max_lr, pct_start=pct,
            pct_final=2 * pct if pct_final is None else pct_final, div_factor=div,
            final_div_factor=final_div)
    else:
        raise Unsupported(f"optax has cos two-phase and linear three-phase one-cycle schedules, "
                          f"not anneal={anneal!r} with three_phase={three}")
    return _evaluate(schedule, t)


_FLOAT64 = ("float64",)

MAPPINGS: dict[str, Mapping] = {
    "linear_warmup": Mapping(
        _linear_warmup, dtypes=_FLOAT64, dialect={"form": "closed"},
        api="optax.linear_schedule(init_value=init_lr, end_value=peak_lr, "
            "transition_steps=warmup_steps)"),
    "step_decay": Mapping(
        _step_decay, dtypes=_FLOAT64, dialect={"form": "recursive"},
        api="optax.piecewise_constant_schedule(base_lr, {m: gamma}) (form=closed: "
            "optax.exponential_decay(base_lr, step_size, gamma, staircase=True))"),
    "cosine": Mapping(
        _cosine, dtypes=_FLOAT64, dialect={"form": "closed", "past_end": "hold"},
        api="optax.cosine_decay_schedule(base_lr, total_steps, alpha=eta_min/base_lr, exponent)"
            " / optax.warmup_cosine_decay_schedule(warmup_init_lr, base_lr, warmup_steps, "
            "total_steps, eta_min, exponent)"),
    "polynomial": Mapping(
        _polynomial, dtypes=_FLOAT64, dialect={"form": "closed"},
        api="optax.polynomial_schedule(base_lr, end_lr, power, total_steps, transition_begin)"),
    "one_cycle": Mapping(
        _one_cycle, dtypes=_FLOAT64, dialect={"boundary": "truncated"},
        api="optax.cosine_onecycle_schedule(total_steps, max_lr, pct_start, div_factor, "
            "final_div_factor) / optax.linear_onecycle_schedule(total_steps, max_lr, "
            "pct_start, pct_final, div_factor, final_div_factor)"),
}
