"""torch.optim.lr_scheduler: one mapping per schedule op (family ``schedules``).

``MAPPINGS[op].fn(t, hparams) -> lr``: ``t`` is a NumPy array of step counts, ``hparams`` the full
hyper-parameter dict of the request; the result is a float64 NumPy array of t's shape.  Each
mapping runs the real torch scheduler a user would write: a dummy ``torch.optim.SGD`` over one
zero float64 tensor with ``lr`` = the schedule's base lr, the scheduler, then ``max(t)`` rounds of
``optimizer.step()`` (a no-op: the tensor has no gradient) and ``scheduler.step()``, recording
``optimizer.param_groups[0]["lr"]`` (a Python float) at each count 0, 1, ..., max(t).  torch
computes its schedules in Python floats whatever the parameters' dtype, so the values are float64.

``form = "closed"`` (where the spec has the knob) calls the deprecated ``scheduler.step(epoch)``
instead, which makes torch use its ``_get_closed_form_lr``; ``"recursive"`` is the chainable
``step()`` every user calls (the torch dialect).  Hyper-parameter values torch cannot express
raise :class:`Unsupported` (the case is SKIP); every hyper-parameter of a request must be read.

``MAPPINGS[op].dialect``: the convention knobs torch follows (the specs' ``[dialects.torch]``);
``MAPPINGS[op].api``: the torch call; ``dtypes`` float64 only (Python floats, see above).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.optim import lr_scheduler

from conformance.adapters import HyperParameters, Unsupported
from conformance.adapters.mapping import Mapping

__all__ = ["MAPPINGS"]


def _hparams(op: str, hparams: dict[str, Any]) -> HyperParameters:
    return HyperParameters(hparams, op=op, framework="torch")


def _counts(t: np.ndarray) -> tuple[np.ndarray, int]:
    t = np.asarray(t, dtype=np.float64)
    if t.size and (not np.all(np.isfinite(t)) or np.any(t < 0) or np.any(t != np.floor(t))):
        raise Unsupported("torch schedulers count steps 0, 1, 2, ...: t must hold such counts")
    index = t.astype(np.int64)
    return index, int(index.max()) if index.size else 0


def _run(t: np.ndarray, lr: float, make: Callable[[torch.optim.Optimizer], Any], *,
         closed: bool = False) -> np.ndarray:
    """The scheduler's lr at each count of ``t`` (step() or, closed, step(epoch))."""
    index, n = _counts(t)
    param = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = make(optimizer)
    values = [float(optimizer.param_groups[0]["lr"])]
    with warnings.catch_warnings():
        # step(epoch) is deprecated (it is how torch reaches _get_closed_form_lr)
        warnings.simplefilter("ignore", UserWarning)
        for epoch in range(1, n + 1):
            optimizer.step()
            if closed:
                scheduler.step(epoch)
            else:
                scheduler.step()
            values.append(float(optimizer.param_groups[0]["lr"]))
    return np.asarray(values, dtype=np.float64)[index]


def _form(hp: HyperParameters) -> bool:
    """True for form = "closed" (step(epoch)), False for "recursive" (step())."""
    return hp.take("form") == "closed"


def _linear_warmup(t: np.ndarray, hparams: dict[str, Any]) -> np.ndarray:
    hp = _hparams("linear_warmup", hparams)
    peak, init, steps = hp.take("peak_lr"), hp.take("init_lr"), hp.take("warmup_steps")
    closed = _form(hp)
    hp.check_all_read()
    start = init / peak
    if not 0.0 < start <= 1.0:
        raise Unsupported(f"torch LinearLR needs 0 < start_factor = init_lr/peak_lr <= 1, got "
                          f"{start!r} (init_lr={init}, peak_lr={peak})")
    return _run(t, peak, lambda opt: lr_scheduler.LinearLR(
        opt, start_factor=start, end_factor=1.0, total_iters=steps), closed=closed)


def _step_decay(t: np.ndarray, hparams: dict[str, Any]) -> np.ndarray:
    hp = _hparams("step_decay", hparams)
    base, gamma, size, marks = (hp.take("base_lr"), hp.take("gamma"), hp.take("step_size"),
                                hp.take("milestones"))
    closed = _form(hp)
    hp.check_all_read()
    if marks is None:
        return _run(t, base, lambda opt: lr_scheduler.StepLR(opt, step_size=size, gamma=gamma),
                    closed=closed)
    return _run(t, base, lambda opt: lr_scheduler.MultiStepLR(
        opt, milestones=list(marks), gamma=gamma), closed=closed)


def _cosine(t: np.ndarray, hparams: dict[str, Any]) -> np.ndarray:
    hp = _hparams("cosine", hparams)
    base, total, eta_min = hp.take("base_lr"), hp.take("total_steps"), hp.take("eta_min")
    hp.expect("exponent", 1.0, why="CosineAnnealingLR has no exponent")
    hp.expect("warmup_steps", 0, why="CosineAnnealingLR has no warmup; SequentialLR is not mapped")
    hp.take("warmup_init_lr")  # unused without a warmup
    past_end = hp.take("past_end")
    closed = _form(hp)
    hp.check_all_read()
    _, n = _counts(t)
    if past_end != "periodic" and n > total:
        raise Unsupported("torch CosineAnnealingLR follows the cosine past T_max "
                          "(past_end='periodic'); it cannot hold eta_min")
    return _run(t, base, lambda opt: lr_scheduler.CosineAnnealingLR(
        opt, T_max=total, eta_min=eta_min), closed=closed)


def _polynomial(t: np.ndarray, hparams: dict[str, Any]) -> np.ndarray:
    hp = _hparams("polynomial", hparams)
    base, total, power = hp.take("base_lr"), hp.take("total_steps"), hp.take("power")
    hp.expect("end_lr", 0.0, why="PolynomialLR decays to 0")
    hp.expect("transition_begin", 0, why="PolynomialLR starts decaying at step 0")
    closed = _form(hp)
    hp.check_all_read()
    return _run(t, base, lambda opt: lr_scheduler.PolynomialLR(
        opt, total_iters=total, power=power), closed=closed)


def _one_cycle(t: np.ndarray, hparams: dict[str, Any]) -> np.ndarray:
    hp = _hparams("one_cycle", hparams)
    max_lr, total, pct = hp.take("max_lr"), hp.take("total_steps"), hp.take("pct_start")
    hp.expect("pct_final", None, why="OneCycleLR's phase 2 is as long as phase 1")
    anneal, three = hp.take("anneal"), hp.take("three_phase")
    div, final_div = hp.take("div_factor"), hp.take("final_div_factor")
    hp.expect("boundary", "shifted", why="OneCycleLR ends phase 1 at float(pct_start * T) - 1")
    hp.check_all_read()
    _, n = _counts(t)
    if n > total:
        raise Unsupported(f"torch OneCycleLR raises past total_steps={total} steps (t up to {n})")
    return _run(t, max_lr / div, lambda opt: lr_scheduler.OneCycleLR(
        opt, max_lr=max_lr, total_steps=total, pct_start=pct, anneal_strategy=anneal,
        cycle_momentum=False, div_factor=div, final_div_factor=final_div, three_phase=three))


_FLOAT64 = ("float64",)

MAPPINGS: dict[str, Mapping] = {
    "linear_warmup": Mapping(
        _linear_warmup, dtypes=_FLOAT64, dialect={"form": "recursive"},
        api="torch.optim.lr_scheduler.LinearLR(opt, start_factor=init_lr/peak_lr, end_factor=1.0, "
            "total_iters=warmup_steps)"),
    "step_decay": Mapping(
        _step_decay, dtypes=_FLOAT64, dialect={"form": "recursive"},
        api="torch.optim.lr_scheduler.StepLR(opt, step_size, gamma) / "
            "MultiStepLR(opt, milestones, gamma)"),
    "cosine": Mapping(
        _cosine, dtypes=_FLOAT64, dialect={"form": "recursive", "past_end": "periodic"},
        api="torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min)"),
    "polynomial": Mapping(
        _polynomial, dtypes=_FLOAT64, dialect={"form": "recursive"},
        api="torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=total_steps, power)"),
    "one_cycle": Mapping(
        _one_cycle, dtypes=_FLOAT64, dialect={"boundary": "shifted"},
        api="torch.optim.lr_scheduler.OneCycleLR(opt, max_lr, total_steps, pct_start, "
            "anneal_strategy, cycle_momentum=False, div_factor, final_div_factor, three_phase)"),
}
