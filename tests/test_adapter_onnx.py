"""The built-in ONNX adapters (onnxruntime, onnx_reference) run through the conformance harness.

The mapped ops pass the quick profile (with the shipped expected-failures files, each entry a
diagnosed deviation of the runtime); plausible mistakes in building the ONNX models are flagged
(the momentum convention flipped, epsilon left at the ONNX default, the per-group affine
interleaved, a 1-based step count); every xfail entry names planned cases and still fails
without the file; the Adam finding's diagnosis (the step count) is reproduced.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")

import reference  # noqa: E402
from conformance import diagnose, runner, xfails  # noqa: E402
from conformance.adapters import Request, Unsupported, load_adapter  # noqa: E402
from conformance.adapters import _onnx_models as models  # noqa: E402
from conformance.dtypes import DTYPES  # noqa: E402

XFAILS = Path(__file__).resolve().parent.parent / "xfails"
NORMALIZERS = ["batch_norm", "group_norm", "instance_norm", "l2_normalize", "layer_norm", "rms_norm"]
OPTIMIZERS = ["adagrad", "adam", "sgd"]


@pytest.fixture(scope="module")
def ort_adapter():
    pytest.importorskip("onnxruntime")
    return load_adapter("onnxruntime")


@pytest.fixture(scope="module")
def ref_adapter():
    return load_adapter("onnx_reference")


def _known(name: str) -> xfails.Xfails:
    return xfails.load(str(XFAILS / f"{name}.toml"))


def _run(adapter, ops: str, dtypes, profile: str = "quick", known: xfails.Xfails | None = None):
    planned = runner.plan(adapter, ops=ops, dtypes=dtypes, profile=profile)
    assert planned, f"nothing planned for {ops}"
    return runner.run(adapter, planned, profile=profile, xfails=known)


def _problems(results) -> list[str]:
    return [f"{r.verdict} {r.id}: {r.message}" for r in results
            if r.verdict in ("FAIL", "ERROR", "XPASS", "CONVENTION")]


# -- the adapters' surface ----------------------------------------------------------------


def test_importing_the_adapters_imports_no_other_framework():
    code = ("import sys, conformance.adapters.onnx_reference\n"
            "import importlib.util\n"
            "if importlib.util.find_spec('onnxruntime'): import conformance.adapters.onnxruntime\n"
            "print(sorted(m for m in ('torch', 'jax', 'keras', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("op", NORMALIZERS + OPTIMIZERS)
def test_declared_dialect_is_the_specs_onnx_table(ref_adapter, op):
    """Each declared convention has the value of the spec's ``onnx`` dialect table (GroupNorm:
    both opsets' affines, the ``onnx`` and ``onnx18`` tables); no layout knob is declared."""
    spec = reference.get(op).spec
    support = ref_adapter.ops()[op]
    assert not support.gradients and support.hparam_dtype == "float32"
    tables = [t for name, t in spec.dialects.items() if name.startswith("onnx")]
    knobs = runner.dialect_knobs(op)
    for key, value in support.dialect.items():
        assert key not in diagnose.LAYOUT_KNOBS
        assert key in knobs or key in tables[0]["hparams"], f"{op}.{key} is not a convention knob"
        values = value if isinstance(value, set) else {value}
        assert values == {t["hparams"][key] for t in tables}, (op, key)


def test_ort_declares_what_runs_and_nothing_else(ort_adapter):
    """Dtypes are found by running each op's ONNX operators: every declared one runs, and the
    runtime's missing kernels (float64 InstanceNormalization, the training operators in ONNX
    Runtime 1.32 CPU) leave those out rather than failing."""
    ops = ort_adapter.ops()
    assert set(ops) <= set(models.MAPPINGS) and set(NORMALIZERS) - {"instance_norm"} <= set(ops)
    for op, support in ops.items():
        assert support.dtypes and not support.gradients and support.hparam_dtype == "float32"
        for dtype in support.dtypes:
            for node, feeds in models.probe_nodes(op, dtype):
                outputs = ort_adapter.run(node, feeds)
                assert all(o.dtype == np.dtype(dtype) for o in outputs), (op, dtype)
        assert "bfloat16" not in support.dtypes
    info = ort_adapter.info()
    assert info["framework"] == "onnxruntime" and info["device"] == "cpu" and int(info["opset"]) >= 23


def test_ort_device_from_the_environment(monkeypatch):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from conformance.adapters import onnxruntime as ort_module

    monkeypatch.setenv("NORMREF_ORT_DEVICE", "tpu")
    with pytest.raises(ValueError, match="expected cpu or cuda"):
        ort_module.make_adapter()
    monkeypatch.setenv("NORMREF_ORT_DEVICE", "cuda")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match="CUDAExecutionProvider is not available"):
            ort_module.make_adapter()
    monkeypatch.setenv("NORMREF_ORT_DEVICE", "cpu")
    assert ort_module.make_adapter().device == "cpu"


def _request(op: str, dtype: str = "float64", *, hparams=None, state=None, **inputs) -> Request:
    spec = reference.get(op).spec
    declared = {k: v for k, v in models.MAPPINGS[op].dialect.items() if not isinstance(v, set)}
    hp = spec.resolve({**declared, **(hparams or {})})
    arrays = {k: np.asarray(v, dtype=dtype) for k, v in inputs.items()}
    if state is None and op in NORMALIZERS:
        initial = reference.get(op).init_state({k: np.asarray(v, np.float64) for k, v in inputs.items()}, **hp)
        state = {k: np.asarray(v, dtype=dtype) for k, v in (initial or {}).items()}
    return Request(op, dtype, arrays, state, hp, None)


_X = np.random.default_rng(0).standard_normal((2, 3, 4))


@pytest.mark.parametrize(
    ("op", "hparams", "inputs", "reason"),
    [
        ("batch_norm", {"momentum": None}, {"x": _X}, "cumulative average"),
        ("batch_norm", {"momentum_convention": "new_weight"}, {"x": _X}, "old_weight"),
        ("instance_norm", {"track_running_stats": True}, {"x": _X}, "no running statistics"),
        ("rms_norm", {"p": 0.5}, {"x": _X}, "partial"),
        ("rms_norm", {}, {"x": _X, "bias": np.zeros(4)}, "no bias"),
        ("rms_norm", {"weight_offset": 1.0}, {"x": _X, "weight": np.zeros(4)}, "weight_offset"),
        ("l2_normalize", {"axes": [1, 2]}, {"x": _X}, "one axis"),
        ("l2_normalize", {"eps": 1e-12}, {"x": _X}, "no eps"),
        ("group_norm", {"num_groups": 3, "axis": 0}, {"x": np.ones((3, 2))}, "batch axis"),
        ("adam", {"amsgrad": True}, {"params/w": np.ones(3), "grads/w": np.ones(3)}, "AMSGrad"),
        ("adam", {"weight_decay_mode": "decoupled_nolr", "weight_decay": 0.1},
         {"params/w": np.ones(3), "grads/w": np.ones(3)}, "after the update"),
        ("sgd", {"momentum": 0.9, "dampening": 0.1}, {"params/w": np.ones(3), "grads/w": np.ones(3)},
         "not a float32 value"),
    ],
)
def test_what_onnx_cannot_express_is_unsupported(ref_adapter, op, hparams, inputs, reason):
    with pytest.raises(Unsupported, match=reason):
        ref_adapter.evaluate(op, _request(op, hparams=hparams, **inputs))


def test_an_unread_hyper_parameter_is_refused(ref_adapter):
    request = _request("layer_norm", x=_X)
    request.hparams["centered"] = True   # a knob a later spec might add
    with pytest.raises(Unsupported, match="centered"):
        ref_adapter.evaluate("layer_norm", request)


def test_models_are_built_once_per_operator_dtypes_shapes_and_attributes(ref_adapter):
    ref_adapter.ops()   # its probes build their own models first
    before = len(ref_adapter._evaluators)
    for _ in range(3):
        ref_adapter.evaluate("layer_norm", _request("layer_norm", hparams={"eps": 1.5e-3}, x=_X))
    ref_adapter.evaluate("layer_norm", _request("layer_norm", hparams={"eps": 2.5e-4}, x=_X))
    assert len(ref_adapter._evaluators) == before + 2


# -- the harness ----------------------------------------------------------------------------


def test_ort_quick_profile_passes_with_its_known_deviations(ort_adapter):
    results = _run(ort_adapter, "^(" + "|".join(NORMALIZERS) + ")$", ["float64", "float32", "float16"],
                   known=_known("onnxruntime"))
    assert not _problems(results), "\n".join(_problems(results))
    passed = {(r.op, r.dtype) for r in results if r.verdict == "PASS"}
    declared = ort_adapter.ops()
    assert passed == {(op, dt) for op in NORMALIZERS if op in declared for dt in declared[op].dtypes}


def test_reference_quick_profile_passes_with_its_known_deviations(ref_adapter):
    """Normalizers in float64 and float16, SGD and Adagrad trajectories in float32."""
    known = _known("onnx_reference")
    results = _run(ref_adapter, "^(" + "|".join(NORMALIZERS) + ")$", ["float64", "float16"], known=known)
    results += _run(ref_adapter, "^(sgd|adagrad)$", ["float32"], known=known)
    assert not _problems(results), "\n".join(_problems(results))
    assert {r.op for r in results if r.verdict == "PASS"} == set(NORMALIZERS) | {"sgd", "adagrad"}


@pytest.mark.parametrize("name", ["onnxruntime", "onnx_reference"])
def test_xfail_entries_name_planned_cases_and_still_fail(name, request):
    """Every entry matches default-profile cases, and (one case per entry, run without the file)
    each still FAILs or ERRORs: a fixed runtime shows up as a stale entry here (and as an XPASS
    in `normref check`)."""
    adapter = request.getfixturevalue("ort_adapter" if name == "onnxruntime" else "ref_adapter")
    known = _known(name)
    planned = runner.plan(adapter, dtypes=list(DTYPES), profile="default")
    assert known and not known.stale([p.id(name) for p in planned])
    first = [next(p for p in planned if entry.regex.search(p.id(name))) for entry in known.entries]
    results = runner.run(adapter, first, profile="default", diagnose_fail=False)
    assert all(r.verdict in ("FAIL", "ERROR") for r in results), [(r.id, r.verdict) for r in results]


# -- mutants: plausible mistakes in building the models are flagged ---------------------------


class _Mutant:
    """An ONNX adapter whose ``run`` changes the node or the feeds before running them."""

    def __init__(self, base) -> None:
        self.base = base
        self.name = base.name

    def info(self):
        return self.base.info()

    def ops(self):
        return self.base.ops()

    def evaluate(self, op, request):
        return models.evaluate(op, request, self.run, self.name)

    def run(self, node, feeds):
        return self.base.run(*self.mutate(node, dict(feeds)))


class _EpsilonDropped(_Mutant):
    """``epsilon`` never set on the node: ONNX's default 1e-5 instead of the case's."""

    def mutate(self, node, feeds):
        return dataclasses.replace(node, attributes=tuple(a for a in node.attributes if a[0] != "epsilon")), feeds


class _TorchMomentum(_Mutant):
    """BatchNormalization given torch's momentum (the weight of the batch) as ONNX's."""

    def mutate(self, node, feeds):
        attributes = tuple((k, float(np.float32(1.0 - v)) if k == "momentum" else v) for k, v in node.attributes)
        return dataclasses.replace(node, attributes=attributes), feeds


class _PerGroupAffine(_Mutant):
    """GroupNormalization-18's per-group scale and bias converted to opset 21's per-channel ones,
    each group's value repeated over its channels (``interleave=False``: what ONNX's version
    converter does) or the group values tiled across the channels (the mistake)."""

    def __init__(self, base, interleave: bool) -> None:
        super().__init__(base)
        self.interleave = interleave

    def mutate(self, node, feeds):
        if node.op_type != "GroupNormalization" or node.version != 18:
            return node, feeds
        channels, groups = feeds["X"].shape[1], feeds["scale"].shape[0]
        expand = np.tile if self.interleave else np.repeat
        for name in ("scale", "bias"):
            feeds[name] = np.ascontiguousarray(expand(feeds[name], channels // groups))
        inputs = tuple((n, d, (channels,) if n in ("scale", "bias") else s) for n, d, s in node.inputs)
        # opset 21 with the adapter's stash_type for float64 (double statistics, as opset 18 has)
        stash = (("stash_type", 11),) if feeds["X"].dtype == np.float64 else ()
        return dataclasses.replace(node, inputs=inputs, version=21, attributes=node.attributes + stash), feeds


class _OneBasedCount(_Mutant):
    """A training loop passing the 1-based step number as ``T`` under the declared conventions."""

    def mutate(self, node, feeds):
        if "T" in feeds:
            feeds["T"] = feeds["T"] + 1
        return node, feeds


def test_epsilon_left_at_the_onnx_default_fails_every_other_eps(ort_adapter):
    """LayerNormalization without its epsilon attribute: the cases with eps = 1e-5 (ONNX's default)
    pass, every other eps (1e-3, Flax's 1e-6, BERT's 1e-12) FAILs."""
    verdicts = {r.case: r.verdict for r in _run(_EpsilonDropped(ort_adapter), "^layer_norm$", ["float64"])}
    assert {verdicts[c] for c in ("no_affine", "flax_tokens", "bert_tokens")} == {"FAIL"}, verdicts
    assert {verdicts[c] for c in ("tokens_last_axis", "weight_only", "onnx_axis_1_of_nchw")} == {"PASS"}


def test_torch_momentum_in_onnx_batch_norm_is_a_convention(ort_adapter):
    results = _run(_TorchMomentum(ort_adapter), "^batch_norm$", ["float32"])
    conventions = [r for r in results if r.verdict == "CONVENTION"]
    assert conventions and all("momentum_convention" in r.diagnosis for r in conventions)
    flagged = {r.case for r in results if r.verdict in ("CONVENTION", "FAIL")}
    assert {"nchw_train", "nc_train_no_affine", "torch_train"} <= flagged


@pytest.mark.parametrize("interleave", [False, True])
def test_per_group_affine_expanded_to_channels(ort_adapter, interleave):
    """Repeating each group's value over its channels is opset 18's semantics (PASS); tiling the
    group values across the channels interleaves them (FAIL)."""
    results = _run(_PerGroupAffine(ort_adapter, interleave), "^group_norm$", ["float64"])
    verdicts = {r.case: r.verdict for r in results}
    assert verdicts["onnx18_per_group"] == ("FAIL" if interleave else "PASS")
    assert verdicts["onnx21"] == "PASS"


def test_a_one_based_step_count_is_flagged(ref_adapter):
    """Momentum with T = t applies beta (1 - dampening) at the first step: the harness names
    first_step=zeros; Adagrad's decay then runs one step ahead: FAIL where lr_decay != 0."""
    results = _run(_OneBasedCount(ref_adapter), "^(sgd|adagrad)$", ["float64"])
    verdicts = {(r.op, r.case): r for r in results}
    for case in ("dampening_fixed", "onnx_momentum_dampening"):
        r = verdicts[("sgd", case)]
        assert r.verdict == "CONVENTION" and "first_step" in r.diagnosis, (case, r.verdict, r.diagnosis)
    assert verdicts[("sgd", "momentum_fixed")].verdict == "PASS"   # no dampening: T does not matter
    for case in ("rosenbrock_lr_decay", "torch_lr_decay_l2", "onnx_decay_factor"):
        assert verdicts[("adagrad", case)].verdict == "FAIL", case


def test_adam_finding_is_the_step_count():
    """The xfailed Adam deviation: with T = t (1-based) every float32 case passes (ONNX Adam is
    the eps-hat Adam), and float64 then fails only by the reference's float32 outputs."""
    from conformance.adapters.onnx_reference import make_adapter

    one_based = make_adapter(step_count="one_based")
    assert one_based.ops()["sgd"].dialect["first_step"] == "zeros"
    float32 = _run(one_based, "^adam$", ["float32"])
    assert {r.verdict for r in float32} <= {"PASS", "SKIP"} and any(r.verdict == "PASS" for r in float32)
    float64 = runner.run(one_based, runner.plan(one_based, ops="^adam$", dtypes=["float64"], profile="quick")[:1],
                         profile="quick", diagnose_fail=False)
    assert float64[0].verdict == "FAIL"
    assert all("returned dtype float32 for a float64 request" in c for c in float64[0].comparisons if "[fail]" in c)
