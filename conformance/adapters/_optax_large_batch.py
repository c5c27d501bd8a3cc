"""optax: the large-batch optimizers LARS and LAMB (the jax adapter loads this file's ``MAPPINGS``).

Built like ``_optax_optim.py`` (class :class:`OptaxStep`): the GradientTransformation a user
writes, its state's fields replaced by the request's values, one ``update``, read back.

``lars`` -> ``optax.lars(lr, weight_decay, weight_decay_mask, trust_coefficient, eps,
trust_ratio_mask, momentum, nesterov)``: ``add_decayed_weights -> masked(scale_by_trust_ratio)
-> scale_by_learning_rate -> trace``.  Its ``TraceState.trace`` accumulates the *negated*,
lr-scaled updates, so the oracle's ``momentum_buffer`` (lr_placement = "inside": ``v = m v +
lr d``, ``w <- w - v``) is ``-trace``; it is loaded and read back with that sign.  optax keeps a
trace even with momentum 0; the oracle has no buffer then, and none is returned.  timm's
``always_adapt = False`` is expressed as a user would: the trust-ratio mask is the trust mask
restricted to the decayed tensors.

``lamb`` -> ``optax.lamb(lr, b1, b2, eps, eps_root, weight_decay, mask)``: ``scale_by_adam ->
add_decayed_weights(mask) -> scale_by_trust_ratio() -> scale_by_learning_rate``; fields
``mu``/``nu``/``count`` of ``ScaleByAdamState``.  The global-norm pre-clip of apex/timm is
``optax.clip_by_global_norm(c)`` chained before it (stateless).  optax.lamb applies the ratio to
every tensor, so a request that leaves some tensor unadapted (trust_mask, trust_scope =
"decayed_only") is Unsupported.
"""

from __future__ import annotations

import numpy as np
import optax

from conformance.adapters import Response, Unsupported
from conformance.adapters._optax_optim import OptaxStep
from conformance.adapters.mapping import Mapping

#: What a request becomes before a mapping sees it.
STEP = OptaxStep


def lars(c: OptaxStep) -> Response:
    """optax.lars; the oracle's momentum buffer is minus optax's trace."""
    c.expect("trust_denominator", "norm_of_sum")
    c.expect("lr_placement", "inside")
    c.expect("first_step", "zeros")
    c.expect("dampening", 0.0)
    c.expect("trust_clip", False)
    c.expect("zero_norm_rule", "one")
    wd = c.take("weight_decay")
    wd_mask = c.mask_tree("weight_decay_mask")
    trust = c.mask_tree("trust_mask")
    if not c.take("always_adapt"):
        trust = {p: trust[p] and wd_mask[p] and wd != 0.0 for p in trust}
    momentum = c.take("momentum")
    tx = optax.lars(c.take("lr"), weight_decay=wd, weight_decay_mask=wd_mask,
                    trust_coefficient=c.take("trust_coefficient"), eps=c.take("eps"),
                    trust_ratio_mask=trust, momentum=momentum, nesterov=c.take("nesterov"))
    if momentum == 0.0:
        return c.run(tx, "lars", {}, count=None)
    for p in c.paths:  # load -buffer as the trace
        key = f"momentum_buffer/{p}"
        if key in c.state:
            c.state[key] = -np.asarray(c.state[key])
    response = c.run(tx, "lars", {"trace": "momentum_buffer"}, count=None)
    response.state = {k: (-v if k.startswith("momentum_buffer/") else v)
                      for k, v in response.state.items()}
    return response


def lamb(c: OptaxStep) -> Response:
    """optax.lamb (with optax.clip_by_global_norm before it for a global pre-clip)."""
    c.expect("weight_decay_mode", "update")
    c.expect("bias_correction", "adam")
    c.expect("grad_averaging", True)
    c.expect("trust_clip", False)
    c.expect("trust_eps", 0.0)
    c.expect("phi_min", 0.0)
    c.expect("phi_max", None)
    c.expect("global_clip_eps", 0.0)
    wd = c.take("weight_decay")
    wd_mask = c.mask_tree("weight_decay_mask")
    trust = c.mask_tree("trust_mask")
    scope = c.take("trust_scope")
    adapted = {p: trust[p] and (scope == "all" or (wd_mask[p] and wd != 0.0)) for p in trust}
    if not all(adapted.values()):
        raise Unsupported("optax.lamb applies the trust ratio to every tensor; it cannot leave "
                          f"{sorted(p for p, a in adapted.items() if not a)} unadapted")
    clip = c.take("global_clip")
    tx = optax.lamb(c.take("lr"), b1=c.take("beta1"), b2=c.take("beta2"), eps=c.take("eps"),
                    eps_root=c.take("eps_root"), weight_decay=wd, mask=wd_mask)
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return c.run(tx, "lamb", {"mu": "exp_avg", "nu": "exp_avg_sq"})


MAPPINGS: dict[str, Mapping] = {
    "lars": Mapping(lars, api="optax.lars", dtypes=OptaxStep.DTYPES,
                    dialect={"trust_denominator": "norm_of_sum", "lr_placement": "inside",
                             "first_step": "zeros", "dampening": 0.0, "trust_clip": False,
                             "zero_norm_rule": "one"},
                    not_kept=("step",)),  # optax.lars keeps no count
    "lamb": Mapping(lamb, api="optax.lamb (after optax.clip_by_global_norm with global_clip)",
                    dtypes=OptaxStep.DTYPES,
                    dialect={"weight_decay_mode": "update", "bias_correction": "adam",
                             "grad_averaging": True, "trust_clip": False, "trust_eps": 0.0,
                             "phi_min": 0.0, "phi_max": None, "global_clip_eps": 0.0}),
}
