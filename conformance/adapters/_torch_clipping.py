"""torch: gradient clipping then plain SGD (the torch adapter loads this file's ``MAPPINGS``).

The clipping specs (``global_norm_clip``, ``per_tensor_clip``) are "SGD on the clipped gradient"
with the coupled L2 decay added *after* clipping.  In torch that is what a training loop writes:
``torch.nn.utils.clip_grad_norm_`` on the ``.grad`` of the parameters, then ``torch.optim.SGD``
whose ``weight_decay`` adds ``lambda w`` to the (already clipped) gradient.  Built like
``_torch_optim`` (class :class:`TorchStep`): parameter groups from ``weight_decay_mask`` (the
undecayed group gets ``weight_decay=0``), ``foreach=False`` for both calls, one ``step()``.

* ``global_norm_clip`` -> ``clip_grad_norm_(all parameters, max_norm, foreach=False)``: torch
  multiplies by ``clamp(c / (n + 1e-6), max=1)``, so it follows ``eps_add = 1e-6`` and nothing
  else.
* ``per_tensor_clip`` -> ``clip_grad_norm_(p, max_norm, foreach=False)`` for each parameter
  (torch has no per-tensor clip; this is the loop a user writes): ``measure = "norm"``,
  ``eps_add = 1e-6``.

AGC has no torch dialect (its torch dialects are timm's and pytorch_optimizer's; the latter is
checked by the ``pytorch_optimizer`` adapter).  SGD keeps no state here and no step count:
``step`` is declared not kept (``not_kept``), supplied by the harness and not compared.
"""

from __future__ import annotations

import torch

from conformance.adapters import Response
from conformance.adapters.mapping import Mapping
from conformance.adapters.torch_step import TorchStep

#: What a request becomes before a mapping sees it (with the torch adapter's device).
STEP = TorchStep


def _sgd(c: TorchStep) -> torch.optim.Optimizer:
    """``SGD(lr, weight_decay)`` without momentum: ``w <- w - lr (g + lambda w)``."""
    wd = c.take("weight_decay")
    return torch.optim.SGD(c.groups("weight_decay_mask", weight_decay=wd), lr=c.take("lr"),
                           foreach=False)


def global_norm_clip(c: TorchStep) -> Response:
    c.expect("eps_add", 1e-6)
    max_norm = c.take("max_norm")
    opt = _sgd(c)
    c.check_all_read("global_norm_clip")
    torch.nn.utils.clip_grad_norm_(list(c.tensors.values()), max_norm, foreach=False)
    return c.finish(opt, {}, "global_norm_clip")


def per_tensor_clip(c: TorchStep) -> Response:
    c.expect("measure", "norm")
    c.expect("eps_add", 1e-6)
    max_norm = c.take("max_norm")
    opt = _sgd(c)
    c.check_all_read("per_tensor_clip")
    for p in c.tensors.values():
        torch.nn.utils.clip_grad_norm_(p, max_norm, foreach=False)
    return c.finish(opt, {}, "per_tensor_clip")


# The SGD step keeps no step count: ``step`` is not kept (supplied by the harness, not compared).
MAPPINGS: dict[str, Mapping] = {
    "global_norm_clip": Mapping(global_norm_clip, dtypes=TorchStep.DTYPES, not_kept=("step",),
                                api="torch.nn.utils.clip_grad_norm_ then torch.optim.SGD",
                                dialect={"eps_add": 1e-6}),
    "per_tensor_clip": Mapping(per_tensor_clip, dtypes=TorchStep.DTYPES, not_kept=("step",),
                               api="torch.nn.utils.clip_grad_norm_ per parameter then torch.optim.SGD",
                               dialect={"measure": "norm", "eps_add": 1e-6}),
}
