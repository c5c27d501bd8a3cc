"""One torch optimizer step on a request: what the torch adapter's optimizer mappings
(``_torch_*.py``) and the ``pytorch_optimizer`` adapter share.

:class:`TorchStep` builds the parameters as ``nn.Parameter`` with ``.grad`` set, makes parameter
groups from masks, loads the request's state into ``optimizer.state`` under the framework's
keys, steps once and reads parameters and state back.  At step 0 the state is left empty, so
torch initializes it itself (SGD's first momentum buffer is a *clone* of the gradient, not a
zero buffer updated with dampening).  The step count is read back from torch
(``state[p]["step"]``, or a parameter group's ``"step"``); an optimizer that keeps none declares
``step`` not kept (``Mapping.not_kept``): the harness supplies the count in every request and
does not compare it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from conformance.adapters import Request, Response, Unsupported
from conformance.adapters.mapping import OptimizerRequest

__all__ = ["TorchStep"]

_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class TorchStep(OptimizerRequest):
    """One optimizer step in torch."""

    #: The dtypes a step runs in (any other request is Unsupported).
    DTYPES: tuple[str, ...] = tuple(_TORCH_DTYPES)

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
