"""torch.optim: one mapping per optimizer op (the torch adapter loads this file's ``OPS``).

Each step builds the parameters as ``nn.Parameter`` with ``.grad`` set, a fresh torch optimizer
over parameter groups (masks become groups: e.g. the parameters without weight decay form a
group with ``weight_decay=0``, as timm's and every recipe's factory does), loads the request's
state into ``optimizer.state`` with torch's own slot names, calls ``optimizer.step()`` once and
reads parameters and state back.  ``foreach=False`` selects the single-tensor code path (the
reference loop torch's fused and foreach paths are tested against); ``make_adapter(...)`` of the
torch adapter does not change it.

At step 0 the torch state is left empty, so torch initializes it itself (SGD's first momentum
buffer is a *clone* of the gradient, not a zero buffer updated with dampening).  The step count
is read back from torch (``state[p]["step"]``, or a parameter group's ``"step"``); SGD keeps none,
so its ``step`` is declared not kept (``NOT_KEPT``): the harness supplies the count in every
request and does not compare it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from conformance.adapters import Request, Response, Unsupported
from conformance.adapters._optim_common import OptimizerRequest

_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class TorchStep(OptimizerRequest):
    """One optimizer step in torch."""

    def __init__(self, request: Request, device: torch.device) -> None:
        super().__init__(request)
        if request.dtype not in _TORCH_DTYPES:
            raise Unsupported(f"torch.optim mappings run float64 and float32, not {request.dtype}")
        self.device = device
        self.dtype = _TORCH_DTYPES[request.dtype]
        self.tensors: dict[str, nn.Parameter] = {}
        for path in self.paths:
            p = nn.Parameter(self.tensor(self.params[path]))
            p.grad = self.tensor(self.grads[path])
            self.tensors[path] = p

    def tensor(self, value: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(value)).to(device=self.device, dtype=self.dtype)

    def groups(self, mask_name: str | None = None, **masked: Any) -> list[dict[str, Any]]:
        """Parameter groups: one group, or (with a mask) the selected parameters with ``masked``
        values and the others with those hyper-parameters set to 0."""
        if mask_name is None:
            return [{"params": list(self.tensors.values()), **masked}]
        where = self.mask(mask_name)
        on = [self.tensors[p] for p in self.paths if where[p]]
        off = [self.tensors[p] for p in self.paths if not where[p]]
        groups = []
        if on:
            groups.append({"params": on, **masked})
        if off:
            groups.append({"params": off, **{k: 0.0 for k in masked}})
        return groups

    def load(self, optimizer: torch.optim.Optimizer, slots: dict[str, str], *,
             step: str | None = "step") -> None:
        """Put the request's state into ``optimizer.state`` (oracle slot -> torch key)."""
        if self.step_count == 0:
            return  # torch initializes its own state on the first step
        for path, p in self.tensors.items():
            entry: dict[str, Any] = {}
            if step is not None:
                entry[step] = torch.tensor(float(self.step_count), dtype=torch.float32)
            for slot, key in slots.items():
                values = self.slot(slot)
                if values is not None:
                    entry[key] = self.tensor(values[path])
            optimizer.state[p] = entry

    def finish(self, optimizer: torch.optim.Optimizer, slots: dict[str, str], op: str) -> Response:
        """Step, then read parameters and state back (oracle slot -> torch key)."""
        self.check_all_read(op)
        optimizer.step()
        outputs = {f"params/{p}": _numpy(t) for p, t in self.tensors.items()}
        state: dict[str, np.ndarray] = {}
        step = _step_of(optimizer)
        if step is not None:
            state["step"] = np.asarray(step)
        for path, p in self.tensors.items():
            torch_state = optimizer.state.get(p, {})
            for slot, key in slots.items():
                if key in torch_state and torch_state[key] is not None:
                    state[f"{slot}/{path}"] = _numpy(torch_state[key])
        return Response(outputs=outputs, state=state)


def _step_of(optimizer: torch.optim.Optimizer) -> float | None:
    """The step count the optimizer keeps: per parameter (torch.optim's ``state[p]["step"]``) or per
    group (pytorch_optimizer's ``group["step"]``); None when it keeps none."""
    for state in optimizer.state.values():
        if isinstance(state, dict) and "step" in state:
            value = state["step"]
            return float(value.item() if isinstance(value, torch.Tensor) else value)
    for group in optimizer.param_groups:
        if "step" in group:
            return float(group["step"])
    return None


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").numpy().copy()


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


_MAPPINGS: dict[str, Callable[[TorchStep], Response]] = {"sgd": sgd, "adam": adam, "adamw": adamw}

#: What the torch adapter reads from an extension file.
OPS: dict[str, Callable[[Request, torch.device], Response]] = {
    name: (lambda request, device, fn=fn: fn(TorchStep(request, device)))
    for name, fn in _MAPPINGS.items()
}
DIALECTS: dict[str, dict[str, Any]] = {
    "sgd": {"lr_placement": "outside", "first_step": "clone", "momentum_correction": False,
            "weight_decay_mode": "l2"},
    "adam": {"adam_eps_mode": "corrected", "amsgrad_max_of": "raw", "weight_decay_mode": "l2"},
    "adamw": {"adam_eps_mode": "corrected", "amsgrad_max_of": "raw",
              "weight_decay_mode": "decoupled_lr"},
}
API = {"sgd": "torch.optim.SGD", "adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW"}
DTYPES = {name: ("float64", "float32") for name in _MAPPINGS}
#: State torch does not keep: supplied by the harness, not compared.
NOT_KEPT = {"sgd": ("step",)}
