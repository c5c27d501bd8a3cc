"""optax: the mapping of ``lookahead`` (the jax adapter loads this file's ``MAPPINGS``).

``optax.lookahead(fast_optimizer, sync_period=k, slow_step_size=alpha, reset_state)`` works on
``LookaheadParams(fast, slow)``: the request's parameters are the fast weights and its ``slow``
slot the slow ones, so the step is called with ``LookaheadParams(fast=params, slow=slow)`` and
both halves of the result are read back (``fast`` -> the output parameters, ``slow`` -> the
``slow`` slot).  optax has no ``first_sync`` form (its slow weights start as the parameters,
``LookaheadParams.init_synced``), so ``slow_init`` must be ``"params"``.

The fast optimizer is what a user would chain for the request's inner optimizer:

* ``inner = "sgd"``: ``add_decayed_weights(wd)`` then ``optax.sgd(lr, momentum)`` for L2 decay;
  ``trace(momentum)``, ``add_decayed_weights(wd)``, ``scale_by_learning_rate(lr)`` for
  ``decoupled_lr``.  optax's ``trace`` starts from zeros where the oracle's sgd clones the first
  gradient: equal because lookahead exposes no dampening.
* ``inner = "adam"``: ``[add_decayed_weights(wd)] scale_by_adam scale_by_learning_rate(lr)``
  (L2) or ``scale_by_adam add_decayed_weights(wd) scale_by_learning_rate(lr)`` (AdamW).

State: ``LookaheadState.steps_since_sync`` is set to ``step mod k`` (the oracle keeps the total
``step``; optax's counter is that number modulo the period, see the spec), and its new value is
checked to agree with the oracle's new step modulo k (an AssertionError, so an ERROR, if not).
The inner slots map to ``mu``/``nu``/``count`` (adam) and ``trace`` (sgd with momentum).  optax
keeps the total step only modulo k and, for sgd, no inner count: ``step`` and ``inner_step`` are
declared not kept (``not_kept``), supplied by the harness in every request, not compared.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

from conformance.adapters import Response, Unsupported
from conformance.adapters._optax_optim import OptaxStep, read_fields, replace_fields
from conformance.adapters.mapping import Mapping

#: What a request becomes before a mapping sees it.
STEP = OptaxStep


def _fast_optimizer(c: OptaxStep) -> tuple[Any, dict[str, str], bool]:
    """``(fast GradientTransformation, {optax field: oracle slot}, keeps a count)``."""
    inner = c.take("inner")
    lr, wd = c.take("lr"), c.take("weight_decay")
    mode = c.expect("weight_decay_mode", "l2", "decoupled_lr")
    momentum = c.take("momentum")
    b1, b2, eps = c.take("beta1"), c.take("beta2"), c.take("eps")
    decay = [optax.add_decayed_weights(wd)] if wd else []
    if inner == "sgd":
        fields = {"trace": "inner_momentum_buffer"} if momentum else {}
        if mode == "l2":
            return optax.chain(*decay, optax.sgd(lr, momentum=momentum or None)), fields, False
        trace = [optax.trace(decay=momentum)] if momentum else []
        return (optax.chain(*trace, *decay, optax.scale_by_learning_rate(lr)), fields, False)
    if inner == "adam":
        core = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
        fields = {"mu": "inner_exp_avg", "nu": "inner_exp_avg_sq"}
        if mode == "l2":
            tx = optax.chain(*decay, core, optax.scale_by_learning_rate(lr))
        else:
            tx = optax.chain(core, *decay, optax.scale_by_learning_rate(lr))
        return tx, fields, True
    raise Unsupported(f"no optax fast optimizer for inner={inner!r}")


def lookahead(c: OptaxStep) -> Response:
    c.expect("slow_init", "params")
    k, alpha, reset = c.take("k"), c.take("alpha"), c.take("reset_state")
    fast_tx, fields, counted = _fast_optimizer(c)
    c.check_all_read("lookahead")
    tx = optax.lookahead(fast_tx, sync_period=k, slow_step_size=alpha, reset_state=reset)
    slow = c.slot_tree("slow")
    if slow is None:       # the initial state: slow = the parameters (init_synced)
        slow = dict(c.jparams)
    params = optax.LookaheadParams(fast=c.jparams, slow=slow)
    state = tx.init(params)
    t = c.step_count
    inner_t = int(round(float(np.asarray(c.state.get("inner_step", 0.0)))))
    values: dict[str, Any] = {"steps_since_sync": jnp.asarray(t % k, dtype=jnp.int32)}
    for field, slot in fields.items():
        tree = c.slot_tree(slot)
        if tree is not None:
            values[field] = tree
    if counted:
        values["count"] = jnp.asarray(inner_t, dtype=jnp.int32)
    state = replace_fields(state, values)
    updates, new_state = tx.update(c.jgrads, state, params)
    new_params = optax.apply_updates(params, updates)
    read = read_fields(new_state, [*fields, "count", "steps_since_sync"])
    if int(read["steps_since_sync"]) != (t + 1) % k:
        raise AssertionError("optax's steps_since_sync disagrees with the oracle's step mod k")
    # optax keeps the step only modulo k (checked above) and an inner count only for Adam: both
    # counts are declared not kept (``not_kept``) and supplied by the harness.
    out_state: dict[str, np.ndarray] = {f"slow/{p}": np.asarray(v) for p, v in new_params.slow.items()}
    for field, slot in fields.items():
        tree = read.get(field)
        if isinstance(tree, dict):
            out_state.update({f"{slot}/{p}": np.asarray(v) for p, v in tree.items()})
    outputs = {f"params/{p}": np.asarray(v) for p, v in new_params.fast.items()}
    return Response(outputs=outputs, state=out_state)


MAPPINGS: dict[str, Mapping] = {
    "lookahead": Mapping(lookahead, dtypes=OptaxStep.DTYPES, dialect={"slow_init": "params"},
                         api="optax.lookahead(fast_optimizer, sync_period, slow_step_size, "
                             "reset_state) on LookaheadParams(fast, slow)",
                         not_kept=("step", "inner_step")),
}
