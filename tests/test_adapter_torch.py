"""The built-in torch adapter: torch's own code paths judged by the harness against the oracle.

The harness runs (quick profile in float64/float32/float16, default profile in float64) must give
no FAIL, ERROR or XPASS.  The deviations torch really has are listed, each with its diagnosis, in
the shipped expected-failures file xfails/torch.toml (also what `normref check torch --xfails
xfails/torch.toml` uses); an entry that matches no planned case fails a test, and one that starts
passing is an XPASS.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import reference  # noqa: E402
from conformance import diagnose, runner, xfails  # noqa: E402
from conformance.adapters import Request, Unsupported  # noqa: E402
from conformance.adapters import torch as torch_adapter  # noqa: E402
from conformance.dtypes import DTYPES, np_dtype  # noqa: E402

# -- known FAILs: the shipped expected-failures file, each entry with its diagnosis -----------

XFAILS_FILE = Path(__file__).resolve().parent.parent / "xfails" / "torch.toml"
KNOWN = xfails.load(str(XFAILS_FILE))


def _run(adapter, *, dtypes, profile, ops=None) -> list[runner.CaseResult]:
    planned = runner.plan(adapter, ops=ops, dtypes=dtypes, profile=profile)
    return runner.run(adapter, planned, profile=profile, xfails=KNOWN)


def _problems(results: list[runner.CaseResult]) -> list[str]:
    """FAIL, ERROR, XPASS and undiagnosed CONVENTION verdicts."""
    bad = []
    for r in results:
        if r.verdict in ("FAIL", "ERROR", "XPASS"):
            bad.append(f"{r.verdict} {r.id}: {r.message}")
        elif r.verdict == "CONVENTION" and not r.diagnosis:
            bad.append(f"CONVENTION without a diagnosis {r.id}: {r.message}")
    return bad


@pytest.fixture(scope="module")
def adapter():
    return torch_adapter.make_adapter("cpu")   # whatever NORMREF_TORCH_DEVICE says


@pytest.fixture(scope="module")
def quick_64_32(adapter):
    return _run(adapter, dtypes=["float64", "float32"], profile="quick")


@pytest.fixture(scope="module")
def quick_16(adapter):
    return _run(adapter, dtypes=["float16"], profile="quick")


# -- the adapter's surface ----------------------------------------------------------------


def test_importing_the_adapter_does_not_import_jax():
    code = ("import sys, conformance.adapters.torch; "
            "print(sorted(m for m in ('jax', 'flax', 'jaxlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"


def test_info_names_framework_version_and_device(adapter):
    info = adapter.info()
    assert adapter.name == "torch"
    assert info["framework"] == "torch" and info["version"] == torch.__version__
    assert info["device"] == "cpu"
    assert all(isinstance(v, str) for v in info.values())


#: The normalizers torch (or timm, for weight standardization) ships, Ghost BN as torch users
#: build it (BatchNorm per chunk) and ConvBN blocks (Conv2d + BatchNorm2d, Inductor's Tune-mode
#: fold, the fused conv); PowerNorm and EvoNorm have no torch layer.
TORCH_NORMALIZERS = ["batch_norm", "conv_bn", "ghost_batch_norm", "group_norm", "instance_norm",
                     "l2_normalize", "layer_norm", "rms_norm", "spectral_norm", "weight_norm",
                     "weight_standardization"]


def test_every_core_normalizer_in_every_dtype(adapter):
    ops = adapter.ops()
    normalizers = TORCH_NORMALIZERS
    assert set(normalizers) <= set(ops)
    for support in (ops[op] for op in normalizers):
        assert set(support.dtypes) == {"float64", "float32", "float16", "bfloat16"}
        assert support.api


@pytest.mark.parametrize("op", sorted(torch_adapter.MAPPINGS))
def test_declared_dialect_is_the_specs_torch_table(adapter, op):
    """Each declared value is a convention knob with the value of the spec's torch dialect
    (timm's for weight standardization, which torch has no op for); no layout knob."""
    table = "timm" if op == "weight_standardization" else "torch"
    spec = reference.get(op).spec
    declared = adapter.ops()[op].dialect
    knobs = runner.dialect_knobs(op)
    for key, value in declared.items():
        assert key not in diagnose.LAYOUT_KNOBS
        assert key in knobs, f"{op}.{key} is not a convention knob"
        assert spec.dialects[table]["hparams"][key] == value
    # and every spec knob the torch table fixes to a string convention is declared
    for key, value in spec.dialects[table]["hparams"].items():
        if key in knobs and isinstance(value, str) and key not in ("dim",):
            assert key in declared, f"{op}: torch's {key}={value!r} is not declared"


def test_device_from_the_environment(monkeypatch):
    monkeypatch.setenv("NORMREF_TORCH_DEVICE", "cpu")
    assert torch_adapter.make_adapter().info()["device"] == "cpu"
    if not torch.cuda.is_available():
        monkeypatch.setenv("NORMREF_TORCH_DEVICE", "cuda")
        with pytest.raises(ValueError, match="cuda"):
            torch_adapter.make_adapter()
    monkeypatch.setenv("NORMREF_TORCH_DEVICE", "gpu")
    with pytest.raises(ValueError, match="'gpu' is not a torch device"):
        torch_adapter.make_adapter()


def _request(op: str, dtype: str = "float64", *, hparams: dict | None = None, state=None,
             cotangents: bool = True, **inputs: np.ndarray) -> Request:
    spec = reference.get(op).spec
    hp = spec.resolve({**torch_adapter.MAPPINGS[op].dialect, **(hparams or {})})
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in inputs.items()}
    if state is None and spec.state:
        state = reference.get(op).init_state(arrays, **hp)
    cts = None
    if cotangents:
        outputs, _ = reference.get(op).apply(arrays, state, **hp)
        rng = np.random.default_rng(1)
        cts = {k: rng.standard_normal(np.shape(v)) for k, v in outputs.items()}
    dt = np_dtype(dtype)

    def cast(d):
        return None if d is None else {k: np.asarray(v, np.float64).astype(dt) for k, v in d.items()}

    return Request(op, dtype, cast(arrays), cast(state), hp, cast(cts))


_RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    ("op", "hparams", "inputs", "reason"),
    [
        ("rms_norm", {"p": 0.5}, {"x": _RNG.standard_normal((2, 8))}, "partial"),
        ("rms_norm", {"eps_placement": "outside"}, {"x": _RNG.standard_normal((2, 8))}, "inside"),
        ("rms_norm", {}, {"x": _RNG.standard_normal((2, 8)), "bias": np.zeros(8)}, "no bias"),
        ("group_norm", {"num_groups": 2, "affine": "per_group"},
         {"x": _RNG.standard_normal((2, 4, 3)), "weight": np.ones(2)}, "per_channel"),
        ("spectral_norm", {"n_power_iterations": 0}, {"weight": _RNG.standard_normal((3, 4))},
         ">= 1"),
        ("spectral_norm", {}, {"weight": _RNG.standard_normal(5)}, "1-D"),
        ("instance_norm", {"track_running_stats": True, "momentum": None},
         {"x": _RNG.standard_normal((2, 3, 4))}, "cumulative"),
        ("weight_standardization", {"correction": 1}, {"weight": _RNG.standard_normal((3, 4))},
         "correction"),
        ("batch_norm", {"momentum_convention": "old_weight"}, {"x": _RNG.standard_normal((4, 3))},
         "new_weight"),
    ],
)
def test_what_torch_cannot_express_is_unsupported(adapter, op, hparams, inputs, reason):
    request = _request(op, hparams=hparams, **inputs)
    with pytest.raises(Unsupported, match=re.escape(reason)):
        adapter.evaluate(op, request)


def test_an_unread_hyper_parameter_is_refused(adapter):
    request = _request("layer_norm", x=_RNG.standard_normal((2, 5)))
    request.hparams["centered"] = True   # a knob a later spec might add
    with pytest.raises(Unsupported, match="centered"):
        adapter.evaluate("layer_norm", request)


def test_torch_refusing_one_value_per_group_is_unsupported(adapter):
    request = _request("group_norm", hparams={"num_groups": 3}, cotangents=False,
                       x=_RNG.standard_normal((1, 3)))
    with pytest.raises(Unsupported, match="more than 1 value"):
        adapter.evaluate("group_norm", request)


def test_bfloat16_arrives_as_ml_dtypes_and_returns_its_values(adapter):
    request = _request("batch_norm", "bfloat16", x=_RNG.standard_normal((4, 3, 2)),
                       weight=np.ones(3), bias=np.zeros(3))
    response = adapter.evaluate("batch_norm", request)
    y = response.outputs["y"]
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, y.astype(np_dtype("bfloat16")).astype(np.float32))
    x = torch.from_numpy(request.inputs["x"].astype(np.float32)).to(torch.bfloat16)
    bn = torch.nn.BatchNorm1d(3, dtype=torch.bfloat16)
    np.testing.assert_array_equal(y, bn(x).detach().float().numpy())
    assert set(response.grads) == {"x", "weight", "bias"}
    assert float(response.state["num_batches_tracked"]) == 1.0


def test_momentum_none_is_the_cumulative_average(adapter):
    """nn.BatchNorm(momentum=None): the k-th batch weighs 1/k, counted by num_batches_tracked."""
    x = _RNG.standard_normal((6, 2))
    state = {"running_mean": np.array([3.0, -1.0]), "running_var": np.array([2.0, 0.5]),
             "num_batches_tracked": np.array(2.0)}
    request = _request("batch_norm", hparams={"momentum": None}, state=state, cotangents=False,
                       x=x)
    new = adapter.evaluate("batch_norm", request).state
    assert float(new["num_batches_tracked"]) == 3.0
    np.testing.assert_allclose(new["running_mean"], (2 * state["running_mean"] + x.mean(0)) / 3)
    np.testing.assert_allclose(new["running_var"], (2 * state["running_var"] + x.var(0, ddof=1)) / 3)


# -- the harness on the adapter --------------------------------------------------------------


def test_quick_profile_float64_float32_has_no_fail_or_error(quick_64_32, adapter):
    assert not _problems(quick_64_32), "\n".join(_problems(quick_64_32))
    ops_seen = {(r.op, r.dtype) for r in quick_64_32 if r.verdict in ("PASS", "CONVENTION")}
    supported = adapter.ops()
    expected = {(op, dt) for op in supported for dt in ("float64", "float32")
                if dt in supported[op].dtypes}
    assert ops_seen == expected


def test_known_failures_are_not_stale(adapter):
    """Each entry of xfails/torch.toml names planned cases (a renamed case must be renamed there)."""
    ids = [p.id("torch") for p in runner.plan(adapter, dtypes=list(DTYPES), profile="default")]
    assert KNOWN
    assert not KNOWN.stale(ids)


def test_quick_profile_float16_has_no_fail_or_error(quick_16):
    assert not _problems(quick_16), "\n".join(_problems(quick_16))


def test_quick_profile_bfloat16_has_no_error(adapter):
    results = runner.run(adapter, runner.plan(adapter, ops="batch_norm|instance_norm|spectral_norm",
                                              dtypes=["bfloat16"], profile="quick"),
                         profile="quick")
    bad = [p for p in _problems(results) if not p.startswith("FAIL ")]
    assert not bad, "\n".join(bad)


def test_default_profile_float64_all_ops(adapter):
    results = _run(adapter, dtypes=["float64"], profile="default")
    assert not _problems(results), "\n".join(_problems(results))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_quick_profile_runs():
    adapter = torch_adapter.make_adapter("cuda")
    assert adapter.info()["device"].startswith("cuda")
    results = runner.run(adapter, runner.plan(adapter, dtypes=["float64", "float32", "float16"],
                                              profile="quick"), profile="quick")
    assert not [r for r in results if r.verdict == "ERROR"]


class _OneBatchNormForTheWholeBatch(torch_adapter.TorchAdapter):
    """Ghost BN's plausible mistake: BatchNorm over the whole batch (one running update)."""

    def evaluate(self, op, request):
        if op != "ghost_batch_norm":
            return super().evaluate(op, request)
        whole = {**request.hparams, "virtual_batch_size": int(next(iter(request.inputs.values())).shape[0]),
                 "split": "chunk_ceil", "chunk_momentum": "same"}
        return super().evaluate(op, Request(op, request.dtype, request.inputs, request.state, whole,
                                            request.cotangents))


def test_ghost_batch_norm_is_batch_norm_per_chunk(adapter):
    """torch BatchNorm per chunk (bigBatch / Composer / tabnet) passes the oracle; BatchNorm over
    the whole batch FAILs every case with more than one ghost batch."""
    planned = runner.plan(adapter, ops="^ghost_batch_norm$", dtypes=("float64", "float32"), profile="quick")
    results = runner.run(adapter, planned, profile="quick")
    assert {r.verdict for r in results} <= {"PASS", "SKIP", "MISTRUSTED"}
    assert sum(r.verdict == "PASS" for r in results) >= 8
    wrong = runner.run(_OneBatchNormForTheWholeBatch(), planned, profile="quick", diagnose_fail=False)
    judged = [r for r in wrong if r.verdict != "SKIP"]
    assert judged and sum(r.verdict == "FAIL" for r in judged) >= len(judged) - 2, \
        [(r.id, r.verdict) for r in judged]
