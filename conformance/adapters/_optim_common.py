"""What the torch.optim and optax mappings share: reading an optimizer request.

An optimizer request (see ``reference/registry.py``) carries flat arrays: inputs
``params/<path>`` and ``grads/<path>``, state ``<slot>/<path>`` or ``<slot>``, and the full
hyper-parameter dict with ``lr`` the learning rate of this step.  A mapping reads every
hyper-parameter it implements with :meth:`OptimizerRequest.take` (or :meth:`expect` for a
convention the framework has no switch for); one it did not read makes the request
Unsupported rather than silently ignored.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import numpy as np

from conformance.adapters import HyperParameters, Request
from reference.optimizers._tree import mask_of

__all__ = ["EXTENSIONS", "OptimizerRequest", "extension_modules", "load_extensions"]


class OptimizerRequest(HyperParameters):
    """The request split into params, grads and state, with hyper-parameter bookkeeping."""

    def __init__(self, request: Request) -> None:
        super().__init__(request.hparams, op=request.op)
        self.request = request
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        for key, value in request.inputs.items():
            kind, _, path = key.partition("/")
            (self.params if kind == "params" else self.grads)[path] = value
        self.paths = list(self.params)
        self.state = dict(request.state or {})

    @property
    def step_count(self) -> int:
        """Steps taken so far (the state's ``step``; 0 when absent)."""
        value = self.state.get("step")
        return 0 if value is None else int(round(float(np.asarray(value, dtype=np.float64))))

    def slot(self, name: str) -> dict[str, np.ndarray] | None:
        """A per-parameter slot ``{path: array}`` of the request's state (None when absent)."""
        found = {p: self.state[f"{name}/{p}"] for p in self.paths if f"{name}/{p}" in self.state}
        return found or None

    def mask(self, name: str) -> dict[str, bool]:
        """A mask hyper-parameter as ``{path: bool}``."""
        return mask_of(self.take(name), self.params, name=name)


class _ScheduleExtension:
    """A schedules mapping file (``SCHEDULES``: op -> fn(t, hparams) -> lr) seen as an extension:
    ``OPS`` take the request (and any device argument, unused: schedules are host-side floats)."""

    def __init__(self, module: Any) -> None:
        self.DIALECTS = dict(getattr(module, "DIALECTS", {}))
        self.API = dict(getattr(module, "API", {}))
        self.DTYPES = {name: ("float64",) for name in module.SCHEDULES}
        self.OPS = {name: self._wrap(fn) for name, fn in module.SCHEDULES.items()}

    @staticmethod
    def _wrap(fn: Any) -> Any:
        from conformance.adapters import Response

        def evaluate(request: Request, *_: Any) -> Response:
            t = np.asarray(request.inputs["t"], dtype=np.float64)
            return Response(outputs={"lr": np.asarray(fn(t, dict(request.hparams)), dtype=np.float64)})

        return evaluate


#: The per-family mapping files of each framework (an explicit list: adding one is a line here,
#: and tests/test_harness.py checks the list against the files present).
EXTENSIONS = {
    "_torch_": ("_torch_adaptive", "_torch_clipping", "_torch_optim", "_torch_schedules"),
    "_optax_": ("_optax_adaptive", "_optax_clipping", "_optax_large_batch", "_optax_lookahead",
                "_optax_optim", "_optax_schedules", "_optax_sign_factored"),
}


@functools.cache
def load_extensions(prefix: str) -> tuple[Any, ...]:
    """The mapping files ``conformance/adapters/<prefix>*.py`` as extensions (imported once): each
    has ``OPS`` (op -> fn(request, ...) -> Response), ``DIALECTS``, ``API`` and ``DTYPES``."""
    found = []
    for name in extension_modules(prefix):
        module = importlib.import_module(name)
        found.append(_ScheduleExtension(module) if hasattr(module, "SCHEDULES") else module)
    return tuple(found)


def extension_modules(prefix: str) -> list[str]:
    """Module names ``conformance.adapters.<prefix>*`` (the per-family mapping files)."""
    return [f"conformance.adapters.{stem}" for stem in EXTENSIONS[prefix]]
