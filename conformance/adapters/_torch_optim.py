"""torch.optim: one mapping per optimizer op (the torch adapter loads this file's ``MAPPINGS``).

Each step builds the parameters as ``nn.Parameter`` with ``.grad`` set, a fresh torch optimizer
over parameter groups (masks become groups: e.g. the parameters without weight decay form a
group with ``weight_decay=0``, as timm's and every recipe's factory does), loads the request's
state into ``optimizer.state`` with torch's own slot names, calls ``optimizer.step()`` once and
reads parameters and state back (:class:`~conformance.adapters.torch_step.TorchStep`).
``foreach=False`` selects the single-tensor code path (the reference loop torch's fused and
foreach paths are tested against); ``make_adapter(...)`` of the torch adapter does not change it.

At step 0 the torch state is left empty, so torch initializes it itself (SGD's first momentum
buffer is a *clone* of the gradient, not a zero buffer updated with dampening).  The step count
is read back from torch (``state[p]["step"]``); SGD keeps none, so its ``step`` is declared not
kept (``not_kept``): the harness supplies the count in every request and does not compare it.
"""

from __future__ import annotations

import torch

from conformance.adapters import Response
from conformance.adapters.mapping import Mapping
from conformance.adapters.torch_step import TorchStep

#: What a request becomes before a mapping sees it (with the torch adapter's device).
STEP = TorchStep


def _decay(c: TorchStep, *modes: str) -> tuple[float, str]:
    mode = c.expect("weight_decay_mode", *modes)
    return c.take("weight_decay"), mode


def sgd(c: TorchStep) -> Response:
    c.expect("lr_placement", "outside")
    c.expect("first_step", "clone")
    c.expect("momentum_correction", False)
    wd, _ = _decay(c, "l2")
    opt = torch.optim.SGD(c.groups("weight_decay_mask", weight_decay=wd), lr=c.take("lr"),
                          momentum=c.take("momentum"), dampening=c.take("dampening"),
                          nesterov=c.take("nesterov"), foreach=False)
    slots = {"momentum_buffer": "momentum_buffer"}
    c.load(opt, slots, step=None)
    return c.finish(opt, slots, "sgd")


def _adam_family(c: TorchStep, op: str) -> Response:
    c.expect("adam_eps_mode", "corrected")
    amsgrad = c.take("amsgrad")
    if amsgrad:
        c.expect("amsgrad_max_of", "raw")
    else:
        c.take("amsgrad_max_of")
    wd, mode = _decay(c, "l2", "decoupled_lr")
    cls = torch.optim.AdamW if mode == "decoupled_lr" else torch.optim.Adam
    opt = cls(c.groups("weight_decay_mask", weight_decay=wd), lr=c.take("lr"),
              betas=(c.take("beta1"), c.take("beta2")), eps=c.take("eps"), amsgrad=amsgrad,
              foreach=False)
    slots = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "max_exp_avg_sq": "max_exp_avg_sq"}
    c.load(opt, slots)
    return c.finish(opt, slots, op)


def adam(c: TorchStep) -> Response:
    return _adam_family(c, "adam")


def adamw(c: TorchStep) -> Response:
    return _adam_family(c, "adamw")


MAPPINGS: dict[str, Mapping] = {
    "sgd": Mapping(sgd, api="torch.optim.SGD", dtypes=TorchStep.DTYPES,
                   dialect={"lr_placement": "outside", "first_step": "clone",
                            "momentum_correction": False, "weight_decay_mode": "l2"},
                   not_kept=("step",)),  # torch's SGD keeps no step count
    "adam": Mapping(adam, api="torch.optim.Adam", dtypes=TorchStep.DTYPES,
                    dialect={"adam_eps_mode": "corrected", "amsgrad_max_of": "raw",
                             "weight_decay_mode": "l2"}),
    "adamw": Mapping(adamw, api="torch.optim.AdamW", dtypes=TorchStep.DTYPES,
                     dialect={"adam_eps_mode": "corrected", "amsgrad_max_of": "raw",
                              "weight_decay_mode": "decoupled_lr"}),
}
