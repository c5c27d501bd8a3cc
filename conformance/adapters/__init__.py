"""The adapter protocol: how the harness talks to a framework.

An adapter is a thin object that maps normref op names to framework calls.  It takes and returns
NumPy arrays, computes gradients with the framework's *own* autodiff, and declares, per op, the
dialect (hyper-parameter values of the op's spec) that its framework follows.

    class Adapter:
        name: str                                   # "torch"
        def info(self) -> dict[str, str]            # {"framework": "torch", "version": "2.13.0", ...}
        def ops(self) -> dict[str, OpSupport]       # op name -> what is supported
        def evaluate(self, op: str, request: Request) -> Response

``OpSupport(dialect={...}, dtypes=(...))``: ``dialect`` holds the values of the spec's convention
knobs that the framework uses (e.g. ``{"momentum_convention": "new_weight",
"running_var_correction": 1}``), merged over the spec's defaults by the runner; ``dtypes`` lists
the dtypes the framework computes in (others are SKIP).

``Request`` carries the inputs (already rounded to ``dtype``), the state (or None for ops without
one), the full hyper-parameter dict (spec defaults, overlaid by the adapter's dialect and the
case's own values), and the cotangents of the outputs (None: forward only).  ``Response`` returns
the outputs, the new state, and the gradients of ``<cotangents, outputs>`` w.r.t. every
differentiable input that was given.  An adapter raises :class:`Unsupported` for a combination
it cannot express (that case is SKIP); any other exception is an ERROR for that case only.

A user adapter is a module (or ``.py`` file) that defines ``ADAPTER`` (an instance) or
``make_adapter()`` (a factory); see :func:`load_adapter`.  Importing an adapter module must not
import any other framework.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "BUILTIN",
    "Adapter",
    "OpSupport",
    "Request",
    "Response",
    "Unsupported",
    "available_builtin",
    "load_adapter",
]

#: Built-in adapters: name -> module that defines ``make_adapter()``.
BUILTIN = {
    "numpy32": "conformance.adapters.numpy32",
    "torch": "conformance.adapters.torch",
    "jax": "conformance.adapters.jax",
    "pytorch_optimizer": "conformance.adapters.pytorch_optimizer",
}

#: The framework package each built-in adapter needs (None: always available).
REQUIRES = {"numpy32": None, "torch": "torch", "jax": "jax", "pytorch_optimizer": "pytorch_optimizer"}


class Unsupported(Exception):
    """The adapter cannot express this op, dtype or hyper-parameter value: the case is SKIP."""


@dataclass(frozen=True)
class OpSupport:
    """What an adapter supports for one op."""

    dialect: dict[str, Any] = field(default_factory=dict)
    dtypes: tuple[str, ...] = ("float64", "float32", "float16")
    api: str = ""


@dataclass
class Request:
    """One evaluation: arrays are NumPy arrays in ``dtype`` (state and inputs alike)."""

    op: str
    dtype: str
    inputs: dict[str, np.ndarray]
    state: dict[str, np.ndarray] | None
    hparams: dict[str, Any]
    cotangents: dict[str, np.ndarray] | None


@dataclass
class Response:
    """What the framework computed; arrays may be in any floating dtype."""

    outputs: dict[str, np.ndarray]
    state: dict[str, np.ndarray] = field(default_factory=dict)
    grads: dict[str, np.ndarray] = field(default_factory=dict)


@runtime_checkable
class Adapter(Protocol):
    name: str

    def info(self) -> dict[str, str]: ...

    def ops(self) -> dict[str, OpSupport]: ...

    def evaluate(self, op: str, request: Request) -> Response: ...


def available_builtin() -> list[str]:
    """Built-in adapters whose framework is installed (without importing the framework)."""
    return [
        name
        for name, package in REQUIRES.items()
        if package is None or importlib.util.find_spec(package) is not None
    ]


def _from_module(module: Any, where: str) -> Adapter:
    if hasattr(module, "ADAPTER"):
        adapter = module.ADAPTER
    elif hasattr(module, "make_adapter"):
        adapter = module.make_adapter()
    else:
        raise ValueError(f"{where} defines neither ADAPTER nor make_adapter()")
    missing = [m for m in ("name", "info", "ops", "evaluate") if not hasattr(adapter, m)]
    if missing:
        raise TypeError(f"{where}: the adapter lacks {', '.join(missing)} (see conformance.adapters)")
    return adapter


def load_adapter(spec: str) -> Adapter:
    """An adapter from a built-in name, a module path (``mypkg.adapter``) or a ``.py`` file path."""
    if spec in BUILTIN:
        return _from_module(importlib.import_module(BUILTIN[spec]), spec)
    path = Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            raise ValueError(f"adapter file {spec!r} does not exist")
        name = f"normref_user_adapter_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:  # pragma: no cover
            raise ValueError(f"cannot load adapter file {spec!r}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return _from_module(module, spec)
    try:
        module = importlib.import_module(spec)
    except ImportError as exc:
        known = ", ".join(BUILTIN)
        raise ValueError(
            f"unknown adapter {spec!r}: not a built-in ({known}), an importable module or a .py file "
            f"({exc})"
        ) from None
    return _from_module(module, spec)
