"""One torch request as the torch adapter's normalizer mappings read it (conformance/adapters/
torch.py): the request's arrays as tensors on the adapter's device (leaves that autograd
differentiates), the hyper-parameters still to be read (the protocol's reader: implemented or
refused, never ignored), and the VJP of the outputs by ``torch.autograd.grad``; plus the small
layout helpers the mappings share (axes moved to the end and back, torch's refusal of a
one-value statistic as Unsupported)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from conformance.adapters import HyperParameters, Request, Response, Unsupported

__all__ = ["DTYPES"]

DTYPES = ("float64", "float32", "float16", "bfloat16")
_TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

#: torch's message when a training-mode statistic would have one value (F._verify_batch_size,
#: F._verify_spatial_size): the case is outside what torch computes.
_SINGLE_VALUE_MESSAGES = ("Expected more than 1 value per channel",
                          "Expected more than 1 spatial element")


# --------------------------------------------------------------------------------------------
# One call: conversions, hyper-parameters, autograd
# --------------------------------------------------------------------------------------------


class _Call(HyperParameters):
    """The tensors of one request, the hyper-parameters still to be read (the protocol's reader),
    the inputs still to be read, and the VJP."""

    def __init__(self, request: Request, device: torch.device) -> None:
        super().__init__(request.hparams, op=request.op, framework="torch")
        self.request = request
        self.device = device
        self.dtype = _TORCH_DTYPES[request.dtype]
        self.unread = {k for k, v in request.inputs.items() if v is not None}
        self.leaves: dict[str, torch.Tensor] = {}

    def check_all_read(self, op: str | None = None) -> None:
        """Refuse a request with a hyper-parameter or an input that the mapping did not read."""
        if self.unread:
            names = ", ".join(f"input {k}" for k in sorted(self.unread))
            raise Unsupported(f"the torch adapter does not implement {op or self.op}'s {names}")
        super().check_all_read(op)

    # arrays -------------------------------------------------------------------------------

    def tensor(self, value: np.ndarray) -> torch.Tensor:
        """A NumPy array (bfloat16 via float32, exactly) as a tensor of the request's dtype."""
        array = np.asarray(value)
        if array.dtype.itemsize < 4 and array.dtype != np.float16:  # ml_dtypes.bfloat16
            array = array.astype(np.float32)
        return torch.from_numpy(np.array(array)).to(device=self.device, dtype=self.dtype)

    def input(self, name: str, *, parameter: bool = False) -> torch.Tensor | None:
        """A differentiable input (None when absent); ``parameter``: as an ``nn.Parameter``."""
        self.unread.discard(name)
        if self.request.inputs.get(name) is None:
            return None
        value = self.tensor(self.request.inputs[name])
        leaf = nn.Parameter(value) if parameter else value.requires_grad_(True)
        self.leaves[name] = leaf
        return leaf

    def state(self, name: str) -> torch.Tensor | None:
        state = self.request.state or {}
        return None if state.get(name) is None else self.tensor(state[name])

    def count(self) -> int:
        """``num_batches_tracked`` of the request's state (0 when absent)."""
        state = self.request.state or {}
        value = state.get("num_batches_tracked")
        return 0 if value is None else int(round(float(np.asarray(value, dtype=np.float64))))

    # results ------------------------------------------------------------------------------

    def finish(self, outputs: dict[str, torch.Tensor],
               state: dict[str, torch.Tensor | float] | None = None) -> Response:
        """Outputs, state and the VJP of the outputs with the request's cotangents."""
        grads: dict[str, np.ndarray] = {}
        cotangents = self.request.cotangents
        if cotangents is not None and self.leaves:
            pairs = [(outputs[k], self.tensor(ct)) for k, ct in cotangents.items()
                     if ct is not None and k in outputs and outputs[k].requires_grad]
            names = list(self.leaves)
            if pairs:
                found = torch.autograd.grad([o for o, _ in pairs], [self.leaves[k] for k in names],
                                            grad_outputs=[c for _, c in pairs], allow_unused=True)
            else:
                found = (None,) * len(names)
            for name, grad in zip(names, found, strict=True):
                leaf = self.leaves[name]
                grads[name] = _numpy(torch.zeros_like(leaf) if grad is None else grad)
        new_state = {k: (_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v, np.float64))
                     for k, v in (state or {}).items()}
        return Response(outputs={k: _numpy(v) for k, v in outputs.items()}, state=new_state,
                        grads=grads)


def _numpy(value: torch.Tensor) -> np.ndarray:
    value = value.detach().to("cpu")
    if value.dtype == torch.bfloat16:
        value = value.to(torch.float32)  # exact: NumPy has no bfloat16
    return value.numpy().copy()


def _single_value_guard(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; torch's refusal of a one-value statistic becomes Unsupported."""
    try:
        return fn()
    except ValueError as exc:
        if any(m in str(exc) for m in _SINGLE_VALUE_MESSAGES):
            raise Unsupported(f"torch refuses this input: {exc}") from None
        raise


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise Unsupported(f"axis {axis} is out of range for {ndim} dims")
    return axis % ndim


def _trailing(x: torch.Tensor, axes: Any) -> tuple[list[int], list[int] | None]:
    """``normalized_shape`` after moving ``axes`` (in increasing order) to the end, and the
    permutation that does it (None when they are already the trailing axes)."""
    axes = sorted(_axis(a, x.ndim) for a in axes)
    if len(set(axes)) != len(axes):
        raise Unsupported(f"repeated normalized axes {axes}")
    perm = [a for a in range(x.ndim) if a not in axes] + axes
    shape = [int(x.shape[a]) for a in axes]
    return shape, (None if perm == list(range(x.ndim)) else perm)


def _permuted(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              perm: list[int] | None) -> torch.Tensor:
    """``fn`` applied with the axes of ``x`` in order ``perm``, the result permuted back."""
    if perm is None:
        return fn(x)
    inverse = [perm.index(a) for a in range(x.ndim)]
    return fn(x.permute(perm)).permute(inverse)
