"""torch.optim Adagrad and RMSprop (the torch adapter loads this file's ``MAPPINGS``).

Built like ``_torch_optim``: parameter groups from ``weight_decay_mask`` (the undecayed group
gets ``weight_decay=0``), ``foreach=False`` (the single-tensor loop), the request's state loaded
under torch's keys, one ``step()``.

* ``adagrad`` -> ``torch.optim.Adagrad``: oracle ``sum`` = torch ``sum``, ``step`` = torch's
  ``step`` (it drives ``lr_decay``).  torch builds its state in ``__init__`` (``sum`` filled with
  ``initial_accumulator_value``, ``step`` 0); at step 0 ``TorchStep.load`` leaves that state
  alone, so the first step uses torch's own initial accumulator (the knob is compared, not
  copied).
* ``rmsprop`` -> ``torch.optim.RMSprop``: ``square_avg``, ``grad_avg`` (centered) and
  ``momentum_buffer`` (momentum > 0) under the same names; torch creates them as zeros at the
  first step (s_0 = 0 is the only initial value torch has).

torch has eps outside the root, lr outside the momentum buffer, L2 (coupled) weight decay, no
Nesterov for RMSprop and no bias correction: other values of those knobs are Unsupported.  The
returned ``step`` is torch's own count (``state[p]["step"]``).
"""

from __future__ import annotations

import torch

from conformance.adapters import Response
from conformance.adapters.mapping import Mapping
from conformance.adapters.torch_step import TorchStep

#: What a request becomes before a mapping sees it (with the torch adapter's device).
STEP = TorchStep


def adagrad(c: TorchStep) -> Response:
    c.expect("eps_placement", "outside")
    c.expect("empty_accumulator", "divide")
    c.expect("weight_decay_mode", "l2")
    wd = c.take("weight_decay")
    opt = torch.optim.Adagrad(c.groups("weight_decay_mask", weight_decay=wd), lr=c.take("lr"),
                              lr_decay=c.take("lr_decay"), eps=c.take("eps"),
                              initial_accumulator_value=c.take("initial_accumulator_value"),
                              foreach=False)
    slots = {"sum": "sum"}
    c.load(opt, slots)
    return c.finish(opt, slots, "adagrad")


def rmsprop(c: TorchStep) -> Response:
    c.expect("eps_placement", "outside")
    c.expect("nesterov", False)
    c.expect("initial_accumulator_value", 0.0)
    c.expect("bias_correction", False)
    c.expect("weight_decay_mode", "l2")
    momentum = c.take("momentum")
    if momentum:
        c.expect("lr_placement", "outside")
    else:
        c.take("lr_placement")  # no buffer: the placement has no effect
    wd = c.take("weight_decay")
    opt = torch.optim.RMSprop(c.groups("weight_decay_mask", weight_decay=wd), lr=c.take("lr"),
                              alpha=c.take("alpha"), eps=c.take("eps"), momentum=momentum,
                              centered=c.take("centered"), foreach=False)
    slots = {"square_avg": "square_avg", "grad_avg": "grad_avg",
             "momentum_buffer": "momentum_buffer"}
    c.load(opt, slots)
    return c.finish(opt, slots, "rmsprop")


MAPPINGS: dict[str, Mapping] = {
    "adagrad": Mapping(adagrad, api="torch.optim.Adagrad", dtypes=TorchStep.DTYPES,
                       dialect={"eps_placement": "outside", "empty_accumulator": "divide",
                                "weight_decay_mode": "l2"}),
    "rmsprop": Mapping(rmsprop, api="torch.optim.RMSprop", dtypes=TorchStep.DTYPES,
                       dialect={"eps_placement": "outside", "lr_placement": "outside",
                                "nesterov": False, "initial_accumulator_value": 0.0,
                                "bias_correction": False, "weight_decay_mode": "l2"}),
}
