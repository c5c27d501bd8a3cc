"""The oracle on a second real array namespace: PyTorch CPU tensors through array-api-compat.

``array_api_strict`` (tests/test_all_ops.py) proves that no NumPy-only call slipped into the
oracle, but its arrays compute with NumPy underneath.  torch has its own kernels, its own dtype
objects and tensor methods (``x.size`` is a method there) and its own rounding, so it shows what
a GPU namespace would meet.  Two checks per op, on every spec case of at most
``GRADCHECK_MAX_SIZE`` elements (the set tests/test_all_ops.py checks on array_api_strict):

* **Same operations.**  With NumPy's kernels for what the array API leaves to the implementation
  (the reductions, whose summation order differs; the elementary functions other than the basic
  arithmetic, ``**`` included; ``sqrt``, correctly rounded in IEEE 754 but not in torch's CPU
  float64 kernel, where about 1% of values are 1 ulp off; and torch's reflected division
  ``c / x``, computed as ``c * (1 / x)`` with two roundings), the oracle on torch tensors
  reproduces NumPy's outputs, state and gradients *bit for bit*, through the public API
  (``apply``/``backward``, ``init``/``step`` on a nested parameter tree).  Every other operation
  (arithmetic, comparisons, ``where``, reshapes, indexing, creation functions, ``astype``) is
  torch's own, and every result must be a float64 torch tensor.
* **Own kernels.**  With torch's own kernels, the oracle on torch tensors, run as an adapter
  through the harness's own oracle path (``conformance.oracle_device.BackendAdapter``:
  ``judge.oracle`` with a torch backend, the path ``NORMREF_BACKEND=cupy`` takes on a GPU), PASSes
  the ``quick`` float64 check against the NumPy oracle: the differences are float64 rounding,
  inside the error model every float64 framework is judged by.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import reference
from conformance import runner
from conformance.cases import default_cases
from conformance.oracle_device import Backend, BackendAdapter
from reference.optimizers._tree import flatten, unflatten

torch = pytest.importorskip("torch")

from test_all_ops import GRADCHECK_MAX_SIZE  # noqa: E402 - after the skip: it needs no torch

pytestmark = pytest.mark.torch

#: Functions of the array API whose float64 results depend on the implementation: reductions and
#: linear algebra (summation order, blocking, LAPACK), elementary functions (not required to be
#: correctly rounded), and sqrt (torch's CPU float64 sqrt is not correctly rounded).
NOT_CORRECTLY_ROUNDED = (
    "sum", "prod", "mean", "std", "var", "cumulative_sum", "cumulative_prod", "vecdot", "matmul",
    "tensordot", "sqrt", "exp", "expm1", "log", "log1p", "log2", "log10", "logaddexp", "pow",
    "hypot", "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "tanh", "asinh",
    "acosh", "atanh",
)
LINALG = ("matmul", "vecdot", "tensordot", "vector_norm", "matrix_norm", "svd", "svdvals", "eigh",
          "eigvalsh", "inv", "solve", "cholesky", "qr", "det", "slogdet", "pinv", "matrix_power", "trace")

OPS = reference.ops()
OPTIMIZERS = set(reference.ops("optimizers"))


def _small_cases(name: str) -> list[Any]:
    return [c for c in default_cases(name) if c.size <= GRADCHECK_MAX_SIZE]


def _to_torch(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: (_to_torch(v) if isinstance(v, dict) else torch.from_numpy(np.array(v)))
            for k, v in tree.items()}


def _to_numpy(value: Any, where: str) -> np.ndarray:
    """A result of the oracle on torch tensors: it must be a float64 torch tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: the oracle returned {type(value).__module__}.{type(value).__name__} "
                        "for torch inputs (a call outside the inputs' namespace)")
    if value.dtype != torch.float64:
        raise TypeError(f"{where}: the oracle returned {value.dtype} for float64 torch inputs")
    return value.numpy()


def _flat_numpy(tree: dict[str, Any], where: str) -> dict[str, np.ndarray]:
    return {k: _to_numpy(v, f"{where} {k}") for k, v in flatten(tree).items()}


def _ulps(a: np.ndarray, b: np.ndarray) -> int:
    """The largest distance in units in the last place between a and b (NaN = NaN)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    if same.all():
        return 0
    # float64 bits as integers ordered like the values (negative values mirrored below zero)
    ia, ib = (np.where(v.view(np.int64) < 0, np.int64(-(2**63)) - v.view(np.int64), v.view(np.int64))
              for v in (a, b))
    return int(np.where(same, 0, np.abs(ia - ib)).max())


def _assert_identical(expected: dict[str, Any], actual: dict[str, np.ndarray], where: str) -> None:
    expected = {k: np.asarray(v) for k, v in flatten(expected).items()}
    assert expected.keys() == actual.keys(), where
    for key, value in expected.items():
        assert actual[key].shape == value.shape, f"{where} {key}"
        distance = _ulps(value, actual[key])
        assert distance == 0, f"{where} {key}: {distance} ulp from NumPy's"


# --------------------------------------------------------------------------------------------
# Same operations: NumPy's kernels where the rounding is the implementation's, bit for bit
# --------------------------------------------------------------------------------------------


_DTYPES = {"float64": np.float64, "float32": np.float32, "int64": np.int64, "bool": np.bool_}


def _host(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return a.numpy()
    if isinstance(a, torch.dtype):
        return _DTYPES[str(a).removeprefix("torch.")]
    return a


def _back(r: Any) -> Any:
    if isinstance(r, tuple):  # svd, eigh, slogdet, qr: named tuples of arrays
        return type(r)(*(_back(v) for v in r))
    return torch.from_numpy(np.array(r))


def _numpy_kernel(name: str, numpy_fn: Any) -> Any:
    """``numpy_fn`` called on the NumPy views of torch tensors, its results as torch tensors."""

    def kernel(*args: Any, **kwargs: Any) -> Any:
        return _back(numpy_fn(*(_host(a) for a in args), **{k: _host(v) for k, v in kwargs.items()}))

    kernel.__name__ = name
    return kernel


@pytest.fixture
def numpy_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """array_api_compat.torch with NumPy's implementation-defined kernels (for one test).

    The operators too: ``**`` and ``@`` are pow and matmul, and torch's reflected division
    ``c / x`` is ``c * (1 / x)``, two roundings (26% of values differ from c / x for c = 3.7),
    where the array API's ``__rtruediv__`` is a division."""
    import array_api_compat.numpy as xp_numpy
    import array_api_compat.torch as xp_torch

    for module, numpy_module, names in ((xp_torch, xp_numpy, NOT_CORRECTLY_ROUNDED),
                                        (xp_torch.linalg, xp_numpy.linalg, LINALG)):
        for name in names:
            if hasattr(module, name) and hasattr(numpy_module, name):
                monkeypatch.setattr(module, name, _numpy_kernel(name, getattr(numpy_module, name)))
    operators = {"__pow__": np.power, "__rpow__": lambda a, b: np.power(b, a), "__matmul__": np.matmul,
                 "__rmatmul__": lambda a, b: np.matmul(b, a), "__rtruediv__": lambda a, b: np.divide(b, a)}
    for name, fn in operators.items():
        monkeypatch.setattr(torch.Tensor, name, _numpy_kernel(name, fn))


def _steps(op: reference.Op) -> int:
    """Calls per case: a stateful op carries its state through three."""
    return 3 if op.spec.state else 1


@pytest.mark.parametrize("name", OPS)
def test_torch_reproduces_numpy_bit_for_bit_with_numpys_kernels(name: str, numpy_kernels: None) -> None:
    op = reference.get(name)
    cases = _small_cases(name)
    assert cases, f"{name} has no spec case of at most {GRADCHECK_MAX_SIZE} elements"
    for case in cases:
        where = f"{name} {case.name}"
        rng = np.random.default_rng(0)
        if name in OPTIMIZERS:
            params = unflatten(dict(case.inputs))  # nested, as a user holds them
            p_np, p_t = params, _to_torch(params)
            s_np, s_t = op.init(p_np, **case.hparams), op.init(p_t, **case.hparams)
            _assert_identical(op.flat_state(s_np), _flat_numpy(op.flat_state(s_t), where), f"{where} init")
            for step in range(3):
                grads = unflatten({k: rng.standard_normal(np.shape(v)) for k, v in case.inputs.items()})
                p_np, s_np = op.step(p_np, grads, s_np, **case.hparams)
                p_t, s_t = op.step(p_t, _to_torch(grads), s_t, **case.hparams)
                _assert_identical(p_np, _flat_numpy(p_t, where), f"{where} step {step} params")
                _assert_identical(op.flat_state(s_np), _flat_numpy(op.flat_state(s_t), where),
                                  f"{where} step {step} state")
            continue
        inputs_t = _to_torch(case.inputs)
        s_np = s_t = None
        for step in range(_steps(op)):
            out_np, s_np = op.apply(case.inputs, s_np, **case.hparams)
            out_t, s_t = op.apply(inputs_t, s_t, **case.hparams)
            _assert_identical(out_np, _flat_numpy(out_t, where), f"{where} step {step} outputs")
            _assert_identical(s_np, _flat_numpy(s_t, where), f"{where} step {step} state")
        if op.spec.differentiable:
            cot = {k: rng.standard_normal(np.shape(v)) for k, v in out_np.items()}
            g_np, b_np = op.backward(case.inputs, None, cot, **case.hparams)
            g_t, b_t = op.backward(inputs_t, None, _to_torch(cot), **case.hparams)
            _assert_identical(g_np, _flat_numpy(g_t, where), f"{where} grads")
            _assert_identical(b_np, _flat_numpy(b_t, where), f"{where} backward state")


def test_torch_low_precision_inputs_are_promoted_like_numpys(numpy_kernels: None) -> None:
    """float16/bfloat16/float32 tensors are promoted exactly, and ``promoted`` names the dtype."""
    op = reference.get("batch_norm")
    x = np.random.default_rng(1).standard_normal((4, 3, 5)).astype(np.float32)
    for dtype, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16"), (torch.float32, "float32")):
        xt = torch.from_numpy(x).to(dtype)
        out_t, _ = op.apply({"x": xt}, None)
        out_np, _ = op.apply({"x": xt.to(torch.float64).numpy()}, None)
        assert out_t.promoted == {"x": name}
        _assert_identical(out_np, {"y": _to_numpy(out_t["y"], "y")}, f"batch_norm {name}")


# --------------------------------------------------------------------------------------------
# Own kernels: the harness's float64 check of the oracle on torch tensors
# --------------------------------------------------------------------------------------------


def _torch_backend() -> Backend:
    """torch CPU tensors as an oracle backend (results must come back as float64 tensors)."""
    def to_device(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}

    return Backend("torch", "cpu", to_device, lambda v: _to_numpy(v, "result"), f"torch {torch.__version__}")


@pytest.mark.parametrize("name", OPS)
def test_torch_own_kernels_pass_the_float64_check(name: str) -> None:
    adapter = BackendAdapter(_torch_backend())
    planned = runner.plan(adapter, ops=f"^{name}$", dtypes=["float64"], profile="quick")
    assert planned, name
    results = runner.run(adapter, planned, profile="quick")
    wrong = [f"{r.case}: {r.verdict} {r.message or r.diagnosis} (ratio {r.worst_ratio:.3g} at {r.worst})"
             for r in results if r.verdict != "PASS"]
    assert not wrong, "\n".join(wrong)
    assert all(r.steps >= 1 and r.worst for r in results), "a case compared nothing"
