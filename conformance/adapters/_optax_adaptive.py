"""optax adagrad and rmsprop (the jax adapter loads this file's ``MAPPINGS``).

Built like ``_optax_optim``: the transformation a user writes (``optax.add_decayed_weights(wd,
mask)`` first for L2 weight decay, then the alias with a constant rate equal to this step's lr),
its state's fields replaced by the request's slots, one ``update`` and ``apply_updates``.

* ``adagrad`` -> ``optax.adagrad`` (``scale_by_rss`` then ``scale_by_learning_rate``): field
  ``sum_of_squares`` = oracle ``sum``.  optax has eps inside the root, the zero-where-empty rule
  and no ``lr_decay``; it keeps no step count, so ``step`` is declared not kept (supplied by the
  harness, never compared).
* ``rmsprop`` -> ``optax.rmsprop``: ``nu`` = ``square_avg`` (``ScaleByRmsState`` or, centered,
  ``ScaleByRStdDevState``), ``mu`` = ``grad_avg`` (centered), ``trace`` = ``momentum_buffer``
  (``TraceState``), ``count`` (the ``...WithCountState`` of ``bias_correction=True``) = ``step``.
  optax's ``trace`` comes after ``scale_by_learning_rate``, whose output is ``-lr u``: the trace
  holds ``-b`` for the oracle's lr-inside buffer ``b = mu b + lr u``.  The mapping negates the
  buffer going in and coming out (exact), so the slot compared is the oracle's ``b``.  optax has
  both eps placements (``eps_in_sqrt``), the lr inside the buffer only, s_0 = ``initial_scale``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optax

from conformance.adapters import Response
from conformance.adapters._optax_optim import OptaxStep
from conformance.adapters.mapping import Mapping

#: What a request becomes before a mapping sees it.
STEP = OptaxStep


def _l2_first(c: OptaxStep) -> list[Any]:
    """``add_decayed_weights`` before the optimizer: L2 folded into the gradient."""
    c.expect("weight_decay_mode", "l2")
    wd = c.take("weight_decay")
    mask = c.mask_tree("weight_decay_mask")
    return [optax.add_decayed_weights(wd, mask=mask)] if wd else []


def adagrad(c: OptaxStep) -> Response:
    c.expect("eps_placement", "inside")
    c.expect("empty_accumulator", "zero")
    c.expect("lr_decay", 0.0)
    chain = _l2_first(c)
    tx = optax.chain(*chain, optax.adagrad(
        c.take("lr"), initial_accumulator_value=c.take("initial_accumulator_value"),
        eps=c.take("eps")))
    return c.run(tx, "adagrad", {"sum_of_squares": "sum"}, count=None)


def _negate_slot(state: dict[str, Any], slot: str) -> None:
    for key in [k for k in state if k.startswith(slot + "/")]:
        state[key] = -np.asarray(state[key])


def rmsprop(c: OptaxStep) -> Response:
    placement = c.take("eps_placement")
    momentum = c.take("momentum")
    if momentum:
        c.expect("lr_placement", "inside")
    else:
        c.take("lr_placement")  # no buffer: the placement has no effect
    centered = c.take("centered")
    chain = _l2_first(c)
    tx = optax.chain(*chain, optax.rmsprop(
        c.take("lr"), decay=c.take("alpha"), eps=c.take("eps"),
        initial_scale=c.take("initial_accumulator_value"), eps_in_sqrt=placement == "inside",
        centered=centered, momentum=momentum or None, nesterov=c.take("nesterov"),
        bias_correction=c.take("bias_correction")))
    fields = {"nu": "square_avg"}
    if centered:
        fields["mu"] = "grad_avg"
    if momentum:
        fields["trace"] = "momentum_buffer"
    _negate_slot(c.state, "momentum_buffer")  # the oracle's b -> optax's trace = -b
    response = c.run(tx, "rmsprop", fields, count="count")
    _negate_slot(response.state, "momentum_buffer")
    return response


# optax.adagrad keeps no count, optax.rmsprop one only with bias_correction: ``step`` is not kept
# (supplied by the harness, not compared; a wrong count still shows in the bias-corrected update).
MAPPINGS: dict[str, Mapping] = {
    "adagrad": Mapping(adagrad, api="optax.adagrad (+ add_decayed_weights)", dtypes=OptaxStep.DTYPES,
                       dialect={"eps_placement": "inside", "empty_accumulator": "zero",
                                "lr_decay": 0.0, "weight_decay_mode": "l2"},
                       not_kept=("step",)),
    "rmsprop": Mapping(rmsprop, api="optax.rmsprop (+ add_decayed_weights)", dtypes=OptaxStep.DTYPES,
                       dialect={"lr_placement": "inside", "weight_decay_mode": "l2"},
                       not_kept=("step",)),
}
