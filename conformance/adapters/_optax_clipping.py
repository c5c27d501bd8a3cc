"""optax: gradient clipping then plain SGD (the jax adapter loads this file's ``MAPPINGS``).

The clipping specs are "SGD on the clipped gradient" with the coupled L2 decay added *after*
clipping; in optax that is the chain a user writes, ``optax.chain(<clip>,
optax.add_decayed_weights(wd, mask), optax.sgd(lr))``, built like ``_optax_optim.py`` (class
:class:`OptaxStep`).  Every transformation in it is stateless (``optax.sgd`` without momentum
keeps an empty state), so no field is loaded or read back and ``step`` is declared not kept
(supplied by the harness, never compared).

* ``global_norm_clip`` -> ``optax.clip_by_global_norm(max_norm)``: ``select(n < c, g, g / n *
  c)``, i.e. ``eps_add = 0``.
* ``per_tensor_clip`` -> ``optax.clip_by_block_rms(max_norm)``: ``u / max(1, rms(u) / c)``, i.e.
  ``measure = "rms"``, ``eps_add = 0``.  optax has no per-tensor *norm* clip.
* ``agc`` -> ``optax.adaptive_grad_clip(clipping, eps)`` (``optax.masked`` by ``clip_mask``):
  ``layout = "out_last"`` (optax's ``unitwise_norm``: axis 0 for 2-D/3-D, all but the last for
  4-D/5-D, the whole norm for vectors), ``compare_guarded = False``.  optax raises for more than
  5 dimensions; such a request is Unsupported.
"""

from __future__ import annotations

import numpy as np
import optax

from conformance.adapters import Response, Unsupported
from conformance.adapters._optax_optim import OptaxStep
from conformance.adapters.mapping import Mapping

#: What a request becomes before a mapping sees it.
STEP = OptaxStep


def _sgd(c: OptaxStep, clip: optax.GradientTransformation, op: str) -> Response:
    """``chain(clip, add_decayed_weights(wd, mask), sgd(lr))``."""
    wd = c.take("weight_decay")
    mask = c.mask_tree("weight_decay_mask")
    decay = [optax.add_decayed_weights(wd, mask=mask)] if wd else []
    tx = optax.chain(clip, *decay, optax.sgd(c.take("lr")))
    return c.run(tx, op, {}, count=None)


def global_norm_clip(c: OptaxStep) -> Response:
    c.expect("eps_add", 0.0)
    return _sgd(c, optax.clip_by_global_norm(c.take("max_norm")), "global_norm_clip")


def per_tensor_clip(c: OptaxStep) -> Response:
    c.expect("measure", "rms")
    c.expect("eps_add", 0.0)
    return _sgd(c, optax.clip_by_block_rms(c.take("max_norm")), "per_tensor_clip")


def agc(c: OptaxStep) -> Response:
    c.expect("layout", "out_last")
    c.expect("compare_guarded", False)
    deep = [p for p in c.paths if np.ndim(c.params[p]) > 5]
    if deep:
        raise Unsupported(f"optax.adaptive_grad_clip infers unit axes up to 5-D only: {deep}")
    clip = optax.adaptive_grad_clip(c.take("clipping"), eps=c.take("eps"))
    mask = c.mask_tree("clip_mask")
    if not all(mask.values()):
        clip = optax.masked(clip, mask)
    return _sgd(c, clip, "agc")


# The SGD step keeps no count: ``step`` is not kept (supplied by the harness, not compared).
MAPPINGS: dict[str, Mapping] = {
    "global_norm_clip": Mapping(
        global_norm_clip, dtypes=OptaxStep.DTYPES, not_kept=("step",), dialect={"eps_add": 0.0},
        api="optax.chain(optax.clip_by_global_norm, optax.add_decayed_weights, optax.sgd)"),
    "per_tensor_clip": Mapping(
        per_tensor_clip, dtypes=OptaxStep.DTYPES, not_kept=("step",),
        dialect={"measure": "rms", "eps_add": 0.0},
        api="optax.chain(optax.clip_by_block_rms, optax.add_decayed_weights, optax.sgd)"),
    "agc": Mapping(
        agc, dtypes=OptaxStep.DTYPES, not_kept=("step",),
        dialect={"layout": "out_last", "compare_guarded": False},
        api="optax.chain(optax.adaptive_grad_clip, optax.add_decayed_weights, optax.sgd)"),
}
