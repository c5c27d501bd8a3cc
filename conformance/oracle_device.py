"""Where the harness evaluates the oracle: NumPy on the CPU (the default) or CuPy on a CUDA GPU.

The oracle is written against the Python array API (``reference/_backend.py``): it computes in
the namespace of the arrays it is given.  The harness holds every quantity as NumPy float64
arrays (inputs rounded to the dtype under test, states, cotangents, the probes of the error
model); :func:`current` says how one oracle evaluation sees them:

* ``numpy`` (default): the arrays as they are, results as float64 NumPy arrays;
* ``cupy``: the arrays copied to the current CUDA device (``cupy.asarray``; int64 labels and bool
  masks keep their dtype), the oracle evaluated there in float64, every result copied back.

Only the oracle's own evaluations move (``conformance.judge.oracle``, the forward, VJP and state
update of a step, and an optimizer's step): the error model's arithmetic, the float32
same-precision baseline and the comparisons stay NumPy, so a report differs between the two
backends only by the oracle's float64 rounding (summation order, the last bit of ``exp``; the
bounds are far above it).

The backend is chosen by the environment variable ``NORMREF_BACKEND`` (``numpy`` | ``cupy``),
read each time an oracle evaluation is built, so the worker processes of ``normref check --jobs``
(spawned, they inherit the environment) use the same one.  :func:`select` is the CLI's
``--oracle-device cpu|cuda``: it validates the choice and sets the variable.

:class:`BackendAdapter` is the oracle on a backend as an adapter, so the harness's float64 check
judges one backend's oracle against another's with the error model every framework gets:
``normref check conformance.oracle_device --dtypes float64`` checks the CuPy oracle against the
NumPy one (``NORMREF_BACKEND`` unset), and the tests run the same on torch tensors on the CPU.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BACKENDS", "DEVICES", "ENV", "Backend", "BackendAdapter", "OracleDeviceError", "cupy_backend",
           "current", "describe", "make_adapter", "select"]

#: The environment variable naming the oracle's array namespace.
ENV = "NORMREF_BACKEND"
#: Backend name -> the device it computes on.
BACKENDS = {"numpy": "cpu", "cupy": "cuda"}
#: ``--oracle-device`` value -> backend name.
DEVICES = {device: name for name, device in BACKENDS.items()}


class OracleDeviceError(ValueError):
    """The backend asked for cannot run here (CuPy missing, or no CUDA device); a ValueError, so
    the CLI reports it as a one-line configuration error."""


@dataclass(frozen=True)
class Backend:
    """One way of evaluating the oracle: ``to_device`` maps the harness's flat dict of NumPy arrays
    to the backend's arrays, ``to_host`` one result back to a float64 NumPy array."""

    name: str
    device: str
    to_device: Callable[[dict[str, np.ndarray]], dict[str, Any]]
    to_host: Callable[[Any], np.ndarray]
    info: str


def _same(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return arrays


def _numpy_host(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


_NUMPY = Backend("numpy", "cpu", _same, _numpy_host, f"numpy {np.__version__} (cpu)")


def _on_numpy(source: str) -> str:
    """How to get the NumPy oracle instead, after an error about ``source``."""
    if source.startswith("--oracle-device"):
        return "; use --oracle-device cpu to run the oracle on NumPy"
    if source.startswith(ENV):
        return f"; unset {ENV} (or set it to numpy) to run the oracle on NumPy"
    return ""


def _cupy_backend(source: str) -> Backend:
    """The CuPy backend, or :class:`OracleDeviceError` naming ``source`` (where the choice came
    from) when CuPy or a CUDA device is missing."""
    try:
        import cupy
    except ImportError as exc:
        raise OracleDeviceError(
            f"{source}: CuPy is not importable ({exc}); install the build for the CUDA driver "
            f"(pip install 'normref[cupy]' for CUDA 12){_on_numpy(source)}") from None
    try:
        available = bool(cupy.cuda.is_available())
    except Exception:  # noqa: BLE001 - a driver or runtime that cannot even be queried: not available
        available = False
    if not available:
        raise OracleDeviceError(
            f"{source}: no CUDA device is available (cupy.cuda.is_available() is False){_on_numpy(source)}")

    def to_device(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: cupy.asarray(v) for k, v in arrays.items()}

    def to_host(value: Any) -> np.ndarray:
        if isinstance(value, cupy.ndarray):
            value = value.get()  # a synchronizing copy: the result is complete when it returns
        return np.asarray(value, dtype=np.float64)

    device = cupy.cuda.Device()
    try:
        name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"].decode()
    except Exception:  # noqa: BLE001 - the name is for reports only
        name = "a CUDA device"
    info = f"cupy {cupy.__version__} on {name} (device {device.id})"
    return Backend("cupy", "cuda", to_device, to_host, info)


@functools.cache
def _backend(name: str, source: str) -> Backend:
    if name == "numpy":
        return _NUMPY
    if name == "cupy":
        return _cupy_backend(source)
    raise ValueError(f"{source}: unknown oracle backend {name!r}; expected one of {', '.join(BACKENDS)}")


def current() -> Backend:
    """The backend ``NORMREF_BACKEND`` names (``numpy`` when unset or empty); ValueError for an
    unknown name, :class:`OracleDeviceError` for ``cupy`` without CuPy or a CUDA device."""
    name = os.environ.get(ENV, "")
    if not name:
        return _NUMPY
    return _backend(name.strip().lower(), f"{ENV}={name!r}")


def select(device: str | None) -> Backend:
    """The CLI's ``--oracle-device``: ``"cuda"`` runs the oracle on CuPy, ``"cpu"`` on NumPy, None
    keeps what ``NORMREF_BACKEND`` says.  Validates the choice before a run starts (ValueError /
    :class:`OracleDeviceError`, one line) and sets ``NORMREF_BACKEND`` so that worker processes
    inherit it.  Returns the backend."""
    if device is None:
        return current()
    if device not in DEVICES:
        raise ValueError(f"--oracle-device must be one of {', '.join(DEVICES)}, got {device!r}")
    backend = _backend(DEVICES[device], f"--oracle-device {device}")
    os.environ[ENV] = backend.name
    return backend


def describe() -> str:
    """The current backend in words, for reports (``numpy 2.4.6 (cpu)``, ``cupy 13.3.0 on NVIDIA
    H100 80GB HBM3 (device 0)``)."""
    return current().info


class BackendAdapter:
    """The float64 oracle evaluated on ``backend``, as an adapter (the harness's own oracle path:
    :func:`conformance.judge.oracle` with that backend).  Every op, float64 only, the specs'
    default dialect."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.name = f"oracle_{backend.name}"

    def info(self) -> dict[str, str]:
        return {"framework": self.backend.name, "version": self.backend.info, "device": self.backend.device,
                "note": "the float64 oracle on this backend"}

    def ops(self) -> dict[str, Any]:
        import reference
        from conformance.adapters import OpSupport

        return {name: OpSupport(dialect={}, dtypes=("float64",), api=f"reference on {self.backend.name}")
                for name in reference.ops()}

    def evaluate(self, op: str, request: Any) -> Any:
        import reference
        from conformance import judge
        from conformance.adapters import Response

        evaluate = judge.oracle(reference.get(op), request.hparams, backend=self.backend,
                                gradients=request.cotangents is not None)
        flat = evaluate(judge.pack(request.inputs, request.state, request.cotangents))
        return Response(outputs=judge.unpack(flat, "outputs."), state=judge.unpack(flat, "state."),
                        grads=judge.unpack(flat, "grads."))


def cupy_backend(source: str) -> Backend:
    """The CuPy backend whatever ``NORMREF_BACKEND`` says; :class:`OracleDeviceError` naming
    ``source`` (who asks) without CuPy or a CUDA device."""
    return _backend("cupy", source)


def make_adapter() -> BackendAdapter:
    """The CuPy oracle as an adapter (:class:`OracleDeviceError` without CuPy or a CUDA device)."""
    return BackendAdapter(cupy_backend("the oracle_cupy adapter (conformance.oracle_device)"))
