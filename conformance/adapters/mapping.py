"""What the built-in adapters' per-op mappings share: the per-op record, the optimizer request
reader, and the loader of the per-family mapping files.

:class:`Mapping` is one op of an adapter: the function that maps it to the framework call and
everything the adapter declares about it (dialect, API, dtypes, state it does not keep, ...),
in one record, so that nothing per op is declared twice.  The built-in adapters
(``torch.py``, ``jax.py``, ``pytorch_optimizer.py``) and the per-family mapping files
(``_torch_*.py``, ``_optax_*.py``) each declare ``MAPPINGS: dict[str, Mapping]``; ``ops()`` is
``{op: mapping.support()}``.

An optimizer request (see ``reference/registry.py``) carries flat arrays: inputs
``params/<path>`` and ``grads/<path>``, state ``<slot>/<path>`` or ``<slot>``, and the full
hyper-parameter dict with ``lr`` the learning rate of this step.  A mapping reads every
hyper-parameter it implements with :meth:`OptimizerRequest.take` (or :meth:`expect` for a
convention the framework has no switch for); one it did not read makes the request
Unsupported rather than silently ignored.

This module imports no framework: the torch and the optax mapping files both build on it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from conformance.adapters import HyperParameters, OpSupport, Request, Response
from reference.optimizers import mask_of

__all__ = ["EXTENSIONS", "Mapping", "OptimizerRequest", "extension_modules", "load_extensions"]


@dataclass(frozen=True)
class Mapping:
    """One op of an adapter: how it is computed and what the adapter declares about it.

    ``fn``
        The mapping itself.  What it takes depends on where it is declared: a ``_Call`` in
        ``torch.py``; the adapter, request, inputs and hyper-parameters in ``jax.py`` (a
        ``JaxAdapter`` builder method); a :class:`~conformance.adapters.torch_step.TorchStep` in
        ``_torch_*.py`` and ``pytorch_optimizer.py``; an ``OptaxStep`` in ``_optax_*.py``;
        ``(t, hparams)`` in the schedules files.  :func:`load_extensions` turns the mapping
        files' ones into ``fn(request, *args) -> Response``.
    ``api``, ``dtypes``, ``dialect``, ``not_kept``, ``state_dtype``
        The fields of the op's :class:`~conformance.adapters.OpSupport` (see there); ``api``
        and ``dtypes`` are required so that every record states them.
    """

    fn: Callable[..., Any]
    _: KW_ONLY
    api: str
    dtypes: tuple[str, ...]
    dialect: dict[str, Any] = field(default_factory=dict)
    not_kept: tuple[str, ...] = ()
    state_dtype: str | None = None

    def support(self) -> OpSupport:
        """The op's entry in the adapter's ``ops()`` (copies: the record stays unchanged)."""
        return OpSupport(dialect=dict(self.dialect), dtypes=tuple(self.dtypes), api=self.api,
                         not_kept=tuple(self.not_kept), state_dtype=self.state_dtype)


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


#: The per-family mapping files of each framework (an explicit list: adding one is a line here,
#: and tests/test_harness.py checks the list against the files present).
EXTENSIONS = {
    "_torch_": ("_torch_adaptive", "_torch_clipping", "_torch_optim", "_torch_schedules"),
    "_optax_": ("_optax_adaptive", "_optax_clipping", "_optax_large_batch", "_optax_lookahead",
                "_optax_optim", "_optax_schedules", "_optax_sign_factored"),
    "_keras_": ("_keras_optim",),
}


@functools.cache
def load_extensions(prefix: str) -> MappingProxyType[str, Mapping]:
    """The ops of the mapping files ``conformance/adapters/<prefix>*.py`` (imported once), in
    file order, each record's ``fn`` made ``fn(request, *args) -> Response`` (``args``: the torch
    adapter's device; none for optax).

    An optimizer file names ``STEP``, the class a request becomes before its mappings see it
    (``TorchStep(request, device)``, ``OptaxStep(request)``).  A schedules file has none: its
    mappings take ``(t, hparams)`` and return the lr."""
    found: dict[str, Mapping] = {}
    for name in extension_modules(prefix):
        module = importlib.import_module(name)
        step = getattr(module, "STEP", None)
        for op, mapping in module.MAPPINGS.items():
            if op in found:
                raise ValueError(f"{name}: {op} is already mapped by another {prefix}* file")
            call = _schedule_call(mapping.fn) if step is None else _step_call(mapping.fn, step)
            found[op] = dataclasses.replace(mapping, fn=call)
    return MappingProxyType(found)


def _step_call(fn: Callable[[Any], Response], step: Callable[..., Any]) -> Callable[..., Response]:
    def evaluate(request: Request, *args: Any) -> Response:
        return fn(step(request, *args))

    return evaluate


def _schedule_call(fn: Callable[[np.ndarray, dict[str, Any]], np.ndarray]) -> Callable[..., Response]:
    # Any device argument is unused: schedules are host-side floats.
    def evaluate(request: Request, *_: Any) -> Response:
        t = np.asarray(request.inputs["t"], dtype=np.float64)
        return Response(outputs={"lr": np.asarray(fn(t, dict(request.hparams)), dtype=np.float64)})

    return evaluate


def extension_modules(prefix: str) -> list[str]:
    """Module names ``conformance.adapters.<prefix>*`` (the per-family mapping files)."""
    return [f"conformance.adapters.{stem}" for stem in EXTENSIONS[prefix]]
