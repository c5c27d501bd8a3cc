"""The adapter protocol: how the harness talks to a framework.

An adapter is a thin object that maps normref op names to framework calls.  It takes and returns
NumPy arrays, computes gradients with the framework's *own* autodiff, and declares, per op, the
dialect (hyper-parameter values of the op's spec) that its framework follows.

    class Adapter:
        name: str                                   # "torch"
        def info(self) -> dict[str, str]            # {"framework": "torch", "version": "2.13.0", ...}
        def ops(self) -> dict[str, OpSupport]       # op name -> what is supported
        def evaluate(self, op: str, request: Request) -> Response

``OpSupport(dialect={...}, dtypes=(...), gradients=..., hparam_dtype=..., not_kept=(...))``:
``dialect`` holds the values of the spec's convention knobs that the framework uses (e.g.
``{"momentum_convention": "new_weight", "running_var_correction": 1}``, or a set of values),
merged over the case's values by the runner; ``dtypes`` lists the dtypes the framework computes
in (no others are planned).  ``ops()`` is validated before a run (conformance/support.py): an
unknown op, dtype, knob, knob value or state name is a configuration error.

``Request`` carries the inputs (already rounded to ``dtype``), the state (or None for ops without
one), the full hyper-parameter dict (spec defaults, overlaid by the adapter's dialect and the
case's own values), and the cotangents of the outputs (None: forward only).  ``Response`` returns
the outputs, the new state, and the gradients of ``<cotangents, outputs>`` w.r.t. every
differentiable input that was given.  Every returned array is in the request's dtype, or in a
wider float dtype holding only values of it (bfloat16 as float32 holding bfloat16 values);
exact counters (step counts) may come in any dtype.  An adapter raises :class:`Unsupported` for a combination
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
    "AdapterLoadError",
    "HyperParameters",
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
    "onnxruntime": "conformance.adapters.onnxruntime",
    "onnx_reference": "conformance.adapters.onnx_reference",
    "keras": "conformance.adapters.keras",
}

#: The framework package each built-in adapter needs (None: always available).
REQUIRES = {"numpy32": None, "torch": "torch", "jax": "jax", "pytorch_optimizer": "pytorch_optimizer",
            "onnxruntime": "onnxruntime", "onnx_reference": "onnx", "keras": "keras"}


class Unsupported(Exception):
    """The adapter cannot express this op, dtype or hyper-parameter value: the case is SKIP."""


class HyperParameters:
    """A request's hyper-parameters, each taken by the code that implements it: ``take`` (the
    value), ``expect`` (a convention the framework has no switch for: another value is
    Unsupported), then ``check_all_read`` (one left unread, a knob added to a spec later, makes
    the request Unsupported instead of silently ignored).  Every built-in adapter reads its
    hyper-parameters through it: implemented or refused, never ignored."""

    def __init__(self, hparams: dict[str, Any], *, op: str = "", framework: str = "the framework") -> None:
        self.hp = dict(hparams)
        self.op = op
        self.framework = framework

    def take(self, name: str) -> Any:
        if name not in self.hp:
            raise Unsupported(f"{self.op}: the request has no hyper-parameter {name!r}")
        return self.hp.pop(name)

    def expect(self, name: str, *values: Any, why: str = "") -> Any:
        """A convention with no switch in the framework: any other value is Unsupported."""
        got = self.take(name)
        if got not in values:
            allowed = " or ".join(repr(v) for v in values)
            reason = f" ({why})" if why else ""
            raise Unsupported(f"{self.op}: {self.framework} follows {name}={allowed}{reason}; "
                              f"it cannot express {got!r}")
        return got

    def check_all_read(self, op: str | None = None) -> None:
        if self.hp:
            raise Unsupported(f"the {self.framework} mapping of {op or self.op} does not implement "
                              f"{', '.join(sorted(self.hp))}")


@dataclass(frozen=True)
class OpSupport:
    """What an adapter supports for one op.

    ``dialect``
        The values of the spec's convention knobs the framework follows, merged over the case's
        values.  A knob may map to a *set* of values the framework implements (e.g.
        ``{"affine": {"per_group", "per_channel"}}`` for a runtime with both opset semantics):
        the case's value is used when the set holds it.
    ``dtypes``
        The dtypes the framework computes in; the run plans no other.
    ``api``
        The framework call, for reports.
    ``gradients``
        False for a forward-only backend (an inference runtime, a kernel library): no
        cotangents are sent, no gradient is judged, and the report says so.
    ``hparam_dtype``
        The precision the framework keeps float hyper-parameters in (``"float32"`` for ONNX
        attributes, or for frameworks whose ``lr`` and betas are float32 variables whatever the
        parameter dtype).  They are rounded to it before the oracle sees them, as the inputs are
        rounded to ``dtype``.
    ``not_kept``
        State slots the framework does not keep (a batch counter, a step count): the harness
        supplies the oracle's value in every request and does not compare them; the report lists
        them as not compared.
    ``state_dtype``
        The dtype the framework keeps its state in for requests in a narrower dtype (Flax keeps
        BatchNorm statistics and SpectralNorm's ``u`` as float32 variables for half-precision
        data; mixed-precision recipes keep float32 running statistics): state returned in it is
        not a dtype mismatch.  None: state comes back in the request's dtype, like everything.
    ``takes_draws``
        For ops with random-draw inputs (a spec's ``draws = true``: InfoBatch's pruning draws):
        True when the framework can be given the draws (they are in the request, and its outputs
        are compared with the oracle's on them); False when it samples its own: the request has
        no draws, the adapter is called many times, and the means of its outputs are tested
        against the op's expectation (conformance/distributional.py).
    """

    dialect: dict[str, Any] = field(default_factory=dict)
    dtypes: tuple[str, ...] = ("float64", "float32", "float16")
    api: str = ""
    gradients: bool = True
    hparam_dtype: str = "float64"
    not_kept: tuple[str, ...] = ()
    state_dtype: str | None = None
    takes_draws: bool = True


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


class AdapterLoadError(ValueError):
    """An adapter could not be loaded: the message names it and the exception (one line); the
    original exception is chained (``__cause__``) for a full traceback."""


#: The pip extra that installs each built-in adapter's framework.
EXTRAS = {"torch": "torch", "jax": "jax", "pytorch_optimizer": "refs", "onnxruntime": "onnx",
          "onnx_reference": "onnx", "keras": "keras"}


def _from_module(module: Any, where: str) -> Adapter:
    try:
        if hasattr(module, "ADAPTER"):
            adapter = module.ADAPTER
        elif hasattr(module, "make_adapter"):
            adapter = module.make_adapter()
        else:
            raise AdapterLoadError(f"{where} defines neither ADAPTER nor make_adapter()")
    except AdapterLoadError:
        raise
    except Exception as exc:
        raise AdapterLoadError(f"cannot create the adapter of {where}: {type(exc).__name__}: {exc}") from exc
    missing = [m for m in ("name", "info", "ops", "evaluate") if not hasattr(adapter, m)]
    if missing:
        raise AdapterLoadError(f"{where}: the adapter lacks {', '.join(missing)} (see conformance.adapters)")
    try:  # what a worker process loads it from again (normref check --jobs)
        adapter._normref_source = str(Path(where).resolve()) if where.endswith(".py") else where
    except AttributeError:  # pragma: no cover - an adapter with __slots__: pickled instead
        pass
    return adapter


def _import(where: str, load: Any) -> Any:
    """Run an adapter module's import, turning any failure into one line naming ``where``."""
    try:
        return load()
    except SyntaxError as exc:
        raise AdapterLoadError(f"cannot load adapter {where}: SyntaxError: {exc.msg} "
                               f"({exc.filename}, line {exc.lineno})") from exc
    except Exception as exc:
        raise AdapterLoadError(f"cannot load adapter {where}: {type(exc).__name__}: {exc}") from exc


def load_adapter(spec: str) -> Adapter:
    """An adapter from a built-in name, a module path (``mypkg.adapter``) or a ``.py`` file path.

    Any failure (a missing framework, a syntax error, an exception at import or in
    ``make_adapter()``) raises :class:`AdapterLoadError` with a one-line message.
    """
    if spec in BUILTIN:
        package = REQUIRES.get(spec)
        if package is not None and importlib.util.find_spec(package) is None:
            raise AdapterLoadError(f"the {spec} adapter needs {package}, which is not installed "
                                   f"(pip install 'normref[{EXTRAS.get(spec, spec)}]')")
        module = _import(f"{spec!r}", lambda: importlib.import_module(BUILTIN[spec]))
        return _from_module(module, spec)
    path = Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            raise AdapterLoadError(f"adapter file {spec!r} does not exist")
        name = f"normref_user_adapter_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:  # pragma: no cover
            raise AdapterLoadError(f"cannot load adapter file {spec!r}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        loader = module_spec.loader
        try:
            _import(f"file {spec!r}", lambda: loader.exec_module(module))
        except AdapterLoadError:
            sys.modules.pop(name, None)
            raise
        return _from_module(module, spec)
    if importlib.util.find_spec(spec.split(".")[0]) is None:
        known = ", ".join(BUILTIN)
        raise AdapterLoadError(f"unknown adapter {spec!r}: not a built-in ({known}), an importable module "
                               "or a .py file")
    module = _import(f"module {spec!r}", lambda: importlib.import_module(spec))
    return _from_module(module, spec)
