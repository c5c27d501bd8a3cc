"""The backend policy: float64 promotion, clear dtype errors, namespace dispatch, and the harness's
choice of oracle backend (``NORMREF_BACKEND``, conformance/oracle_device.py).  GPU runs: tests/test_gpu.py."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import reference
from conformance import judge, oracle_device
from conformance.cases import default_cases
from reference._backend import Outputs, as_float64, device, namespace, size, to_numpy


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_inputs_are_promoted_exactly(dtype):
    x = np.random.default_rng(0).standard_normal(7).astype(dtype)
    y, orig = as_float64(x, "x")
    assert y.dtype == np.float64
    assert orig == (None if dtype == np.float64 else np.dtype(dtype).name)
    np.testing.assert_array_equal(y.astype(dtype), x)  # every low-precision value is a float64


def test_bfloat16_is_accepted_when_ml_dtypes_is_installed():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.array([1.5, -2.25], dtype=ml_dtypes.bfloat16)
    y, orig = as_float64(x, "x")
    assert orig == "bfloat16" and y.dtype == np.float64
    np.testing.assert_array_equal(y, [1.5, -2.25])


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_, np.complex64])
def test_non_float_arrays_are_rejected_naming_the_argument(dtype):
    with pytest.raises(TypeError, match=r"myop: weight must have a real floating dtype"):
        as_float64(np.zeros(3, dtype=dtype), "weight", op="myop")


def test_python_scalars_and_lists_become_float64():
    y, orig = as_float64([1, 2, 3], "x")
    assert y.dtype == np.float64 and orig is None
    with pytest.raises(TypeError, match="x must be a real floating array, got a boolean"):
        as_float64(True, "x")


def test_mixed_namespaces_are_an_error():
    xs = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError):
        namespace(np.zeros(2), xs.zeros(2))


def test_outputs_records_promotions():
    out = Outputs({"y": np.zeros(1)}, promoted={"x": "float16"})
    assert out.promoted == {"x": "float16"} and "promoted" in repr(out)
    assert to_numpy(np.ones(2)).dtype == np.float64


def test_size_and_device_of_arrays():
    x = np.zeros((2, 3, 4))
    assert size(x) == 24 and size(np.float64(1.0)) == 1 and device(x) == "cpu"
    xs = pytest.importorskip("array_api_strict")
    other = xs.Device("device1")
    assert device(xs.asarray(x, device=other)) == other and size(xs.asarray(x)) == 24


# --------------------------------------------------------------------------------------------
# NORMREF_BACKEND and --oracle-device
# --------------------------------------------------------------------------------------------


def test_numpy_is_the_default_backend(monkeypatch):
    monkeypatch.delenv(oracle_device.ENV, raising=False)
    assert oracle_device.current().name == "numpy"
    for value in ("numpy", "NumPy", " numpy "):
        monkeypatch.setenv(oracle_device.ENV, value)
        assert oracle_device.current().name == "numpy"


def test_an_unknown_backend_is_a_value_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv(oracle_device.ENV, "jax")
    with pytest.raises(ValueError, match=r"^NORMREF_BACKEND='jax': unknown oracle backend 'jax'; expected one "
                                         r"of numpy, cupy$"):
        oracle_device.current()
    op = reference.get("layer_norm")
    with pytest.raises(ValueError, match="NORMREF_BACKEND"):
        judge.oracle(op, op.dialect("torch"))


def _no_gpu_cupy() -> Any:
    """A CuPy that imports but finds no CUDA device (a CUDA wheel on a machine without a GPU)."""
    return SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: False), __version__="13.0.0")


@pytest.mark.parametrize("cupy", [None, "no_gpu"], ids=["not_installed", "no_gpu"])
def test_cupy_without_a_gpu_is_a_one_line_error_naming_the_variable(monkeypatch, cupy):
    # None in sys.modules makes `import cupy` raise ImportError
    monkeypatch.setitem(sys.modules, "cupy", None if cupy is None else _no_gpu_cupy())
    monkeypatch.setenv(oracle_device.ENV, "cupy")
    why = "CuPy is not importable" if cupy is None else r"no CUDA device is available \(cupy.cuda"
    with pytest.raises(oracle_device.OracleDeviceError, match=rf"^NORMREF_BACKEND='cupy': {why}") as info:
        oracle_device.current()
    message = str(info.value)
    assert "\n" not in message and message.endswith("unset NORMREF_BACKEND (or set it to numpy) to run the "
                                                    "oracle on NumPy")
    assert isinstance(info.value, ValueError)  # the CLI's configuration errors: exit 2, one line
    monkeypatch.delenv(oracle_device.ENV)
    with pytest.raises(oracle_device.OracleDeviceError, match=rf"^--oracle-device cuda: {why}.*--oracle-device cpu"):
        oracle_device.select("cuda")
    assert oracle_device.ENV not in __import__("os").environ  # nothing set when refused
    with pytest.raises(oracle_device.OracleDeviceError, match="oracle_cupy adapter"):
        oracle_device.make_adapter()


def test_select_validates_and_sets_the_variable_for_worker_processes(monkeypatch):
    monkeypatch.setenv(oracle_device.ENV, "numpy")
    assert oracle_device.select(None).name == "numpy"
    assert oracle_device.select("cpu").name == "numpy"
    assert __import__("os").environ[oracle_device.ENV] == "numpy"
    with pytest.raises(ValueError, match=r"^--oracle-device must be one of cpu, cuda, got 'gpu'$"):
        oracle_device.select("gpu")
    assert oracle_device.describe().startswith(f"numpy {np.__version__}")


# --------------------------------------------------------------------------------------------
# The harness's oracle on arrays of another device (what NORMREF_BACKEND=cupy does), on the CPU
# --------------------------------------------------------------------------------------------


def _strict_device_backend() -> oracle_device.Backend:
    """array_api_strict arrays on a second device: an operation mixing devices raises, and a
    NumPy call on them raises too, as on a GPU.  Results must come back on that device."""
    xs = pytest.importorskip("array_api_strict")
    other, cpu = xs.Device("device1"), xs.Device("CPU_DEVICE")

    def to_device(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: xs.asarray(v, device=other) for k, v in arrays.items()}

    def to_host(value: Any) -> np.ndarray:
        if not (hasattr(value, "device") and value.device == other):
            raise TypeError(f"the oracle returned {type(value).__name__} on "
                            f"{getattr(value, 'device', 'no device')}, not an array on {other}")
        return np.asarray(value.to_device(cpu), dtype=np.float64)

    return oracle_device.Backend("strict", "device1", to_device, to_host, "array_api_strict on device1")


@pytest.mark.parametrize("name", reference.ops())
def test_the_harness_oracle_on_another_device_matches_numpy(name):
    """judge.oracle with a backend whose arrays live on a second device gives the NumPy oracle's
    values bit for bit (array_api_strict computes with NumPy): the move to the device and back is
    exact, and every array the oracle creates is created beside its inputs (``device=``)."""
    op = reference.get(name)
    backend = _strict_device_backend()
    for case in [c for c in default_cases(name) if c.size <= 20_000]:
        rng = np.random.default_rng(0)
        if op.spec.is_optimizer:
            grads = {f"grads/{k}": rng.standard_normal(np.shape(v)) for k, v in case.inputs.items()}
            inputs, cts = {**{f"params/{k}": v for k, v in case.inputs.items()}, **grads}, None
        else:
            out, _ = op.apply(case.inputs, None, **case.hparams)
            inputs = case.inputs
            cts = {k: rng.standard_normal(np.shape(v)) for k, v in out.items()} if op.spec.differentiable else None
        state = None  # the first step creates the initial state on the device; the second reads it
        for step in range(2 if op.spec.state else 1):
            arrays = judge.pack(inputs, state, cts)
            expected = judge.oracle(op, case.hparams, backend=oracle_device.current())(arrays)
            actual = judge.oracle(op, case.hparams, backend=backend)(arrays)
            assert expected.keys() == actual.keys()
            for key, value in expected.items():
                np.testing.assert_array_equal(actual[key], value, strict=True,
                                              err_msg=f"{name} {case.name} step {step} {key}")
            state = judge.unpack(expected, "state.")
