"""The backend policy: float64 promotion, clear dtype errors, namespace dispatch, CuPy on a GPU."""

from __future__ import annotations

import numpy as np
import pytest

import reference
from reference._backend import Outputs, as_float64, namespace, to_numpy


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


def _gpu_available() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:
        return False


@pytest.mark.skipif(not _gpu_available(), reason="CuPy with a CUDA device is not available")
@pytest.mark.parametrize("name", reference.ops("normalizers"))
def test_cupy_arrays_compute_on_the_gpu_and_match_numpy(name):
    import cupy

    from conformance.cases import default_cases

    op = reference.get(name)
    case = default_cases(name)[0]
    out_np, _ = op.apply(case.inputs, None, **case.hparams)
    out_cp, _ = op.apply({k: cupy.asarray(v) for k, v in case.inputs.items()}, None, **case.hparams)
    for key, value in out_np.items():
        assert isinstance(out_cp[key], cupy.ndarray)
        np.testing.assert_allclose(cupy.asnumpy(out_cp[key]), value, rtol=1e-13, atol=1e-14)
