"""The oracle on a CUDA GPU through CuPy (``NORMREF_BACKEND=cupy``, conformance/oracle_device.py).

Skipped without a usable GPU: the test is ``cupy.cuda.is_available()``, not the import alone (a
CUDA wheel imports on a machine without a GPU and fails at its first allocation).  The CPU side
of the same machinery is tested without a GPU in tests/test_backend.py (the harness's oracle on
arrays of a second device, bit for bit) and tests/test_array_api_torch.py (a second real
namespace with its own kernels).  Here the GPU's own kernels (other summation orders, CUDA's
libm) are judged by the harness's float64 check against the NumPy oracle, as any float64
framework is, and the harness is run with its oracle on the GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import reference
from conformance import judge, memo, oracle_device, runner
from conformance.cases import default_cases


def _gpu_available() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:  # noqa: BLE001 - not installed, no driver, no device: no GPU tests
        return False


pytestmark = pytest.mark.skipif(not _gpu_available(), reason="CuPy with a CUDA device is not available")

#: A few ops of every kind: batch and row statistics, a power iteration with an SVD start, the
#: EvoNorm and PowerNorm states, optimizers with norms and factored moments, a schedule, a stream
#: and a selection rule with integer ranks.
GPU_OPS = ("batch_norm", "layer_norm", "group_norm", "rms_norm", "spectral_norm", "evo_norm", "power_norm",
           "adam", "lamb", "adafactor", "ranger21", "cosine", "gradient_noise_scale", "infobatch")


XFAILS = Path(__file__).resolve().parents[1] / "xfails" / "torch.toml"


def _cupy_backend() -> oracle_device.Backend:
    return oracle_device.select("cuda")


@pytest.fixture
def numpy_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness's own oracle on NumPy (whatever the environment says), nothing remembered."""
    monkeypatch.delenv(oracle_device.ENV, raising=False)
    memo.clear()


@pytest.mark.parametrize("name", GPU_OPS)
def test_cupy_inputs_give_cupy_results(name: str, numpy_oracle: None) -> None:
    """The public API on CuPy arrays computes on the GPU: every output, state and gradient is a
    float64 CuPy array of NumPy's shape."""
    import cupy

    op = reference.get(name)
    case = next(c for c in default_cases(name) if c.size <= 20_000)

    def gpu(tree: dict[str, Any]) -> dict[str, Any]:
        return {k: cupy.asarray(v) for k, v in tree.items()}

    if op.spec.is_optimizer:
        grads = {k: np.full_like(v, 0.1) for k, v in case.inputs.items()}
        params_np, state_np = op.step(dict(case.inputs), grads, None, **case.hparams)
        params_cp, state_cp = op.step(gpu(case.inputs), gpu(grads), None, **case.hparams)
        pairs = [(params_np, params_cp), (op.flat_state(state_np), op.flat_state(state_cp))]
    else:
        out_np, state_np = op.apply(case.inputs, None, **case.hparams)
        out_cp, state_cp = op.apply(gpu(case.inputs), None, **case.hparams)
        pairs = [(out_np, out_cp), (state_np, state_cp)]
        if op.spec.differentiable:
            cot = {k: np.ones(np.shape(v)) for k, v in out_np.items()}
            pairs.append((op.vjp(case.inputs, None, cot, **case.hparams),
                          op.vjp(gpu(case.inputs), None, gpu(cot), **case.hparams)))
    for expected, actual in pairs:
        assert expected.keys() == actual.keys()
        for key, value in actual.items():
            assert isinstance(value, cupy.ndarray) and value.dtype == cupy.float64, (name, key, type(value))
            assert value.shape == np.shape(expected[key]), (name, key)


@pytest.mark.parametrize("name", GPU_OPS)
def test_the_cupy_oracle_passes_the_float64_check(name: str, numpy_oracle: None) -> None:
    """The oracle on the GPU, as an adapter, against the NumPy oracle: every quick float64 case
    PASSes (its differences are float64 rounding, inside the error model)."""
    adapter = oracle_device.BackendAdapter(_cupy_backend())
    planned = runner.plan(adapter, ops=f"^{name}$", dtypes=["float64"], profile="quick")
    results = runner.run(adapter, planned, profile="quick")
    wrong = [f"{r.case}: {r.verdict} {r.message or r.diagnosis}" for r in results if r.verdict != "PASS"]
    assert planned and not wrong, "\n".join(wrong)


def test_normref_backend_cupy_runs_the_harness_oracle_on_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """With NORMREF_BACKEND=cupy the harness's oracle moves its arrays to the GPU (counted) and
    judges the NumPy oracle, as an adapter, PASS in float64 and float32."""
    import cupy

    from conformance.adapters.numpy32 import NumPy32Adapter

    moved = []
    real_asarray = cupy.asarray
    monkeypatch.setattr(cupy, "asarray", lambda a, *args, **kw: moved.append(1) or real_asarray(a, *args, **kw))
    monkeypatch.setenv(oracle_device.ENV, "cupy")
    memo.clear()
    op = reference.get("layer_norm")
    case = default_cases("layer_norm")[0]
    flat = judge.oracle(op, case.hparams)(judge.pack(case.inputs, None, None))
    assert moved and all(type(v) is np.ndarray and v.dtype == np.float64 for v in flat.values())
    adapter = NumPy32Adapter()
    planned = runner.plan(adapter, ops="^(layer_norm|batch_norm|adam)$", dtypes=["float64", "float32"],
                          profile="quick")
    results = runner.run(adapter, planned, profile="quick")
    assert not [r.id for r in results if r.verdict not in ("PASS", "MISTRUSTED")]
    memo.clear()


def test_torch_cuda_against_the_cupy_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU-only setup of the README: torch on CUDA (NORMREF_TORCH_DEVICE=cuda) judged by the
    oracle on CuPy (NORMREF_BACKEND=cupy); LayerNorm and AdamW quick, float64 and float32."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    from conformance.adapters import load_adapter
    from conformance.xfails import load as load_xfails

    monkeypatch.setenv("NORMREF_TORCH_DEVICE", "cuda")
    monkeypatch.setenv(oracle_device.ENV, "cupy")
    memo.clear()
    adapter = load_adapter("torch")
    assert adapter.info()["device"].startswith("cuda")
    planned = runner.plan(adapter, ops="^(layer_norm|adamw)$", dtypes=["float64", "float32"], profile="quick")
    results = runner.run(adapter, planned, profile="quick", xfails=load_xfails(str(XFAILS)))
    assert not [f"{r.id}: {r.verdict} {r.message}" for r in results
                if r.verdict not in ("PASS", "MISTRUSTED", "XFAIL")]
    memo.clear()
