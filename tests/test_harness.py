"""The harness: verdicts, fault isolation, dialect diagnosis, determinism, reports and exit codes."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

import harness_adapters as ha
import reference
from conformance import report, runner
from conformance.cli import main
from conformance.planning import REALISTIC_SIZE
from conformance.xfails import Xfails

HERE = Path(__file__).parent


def _run(adapter, ops="^(batch_norm|layer_norm)$", dtypes=("float64",), profile="quick", **kw):
    planned = runner.plan(adapter, ops=ops, dtypes=dtypes, profile=profile)
    return runner.run(adapter, planned, profile=profile, **kw)


@pytest.mark.parametrize("op", reference.ops())
def test_the_oracle_itself_passes_everything_in_float64(op):
    """No false alarms: every op, every case of the default profile but the realistic-size ones,
    float64 — the error model accepts the oracle.  (Against itself the oracle is exact at any
    size; a realistic case would only pay for its bound: the torch adapter's tests run them.)"""
    adapter = ha.OracleAdapter()
    planned = [p for p in runner.plan(adapter, ops=f"^{op}$", dtypes=("float64",), profile="default")
               if p.case.size <= REALISTIC_SIZE]
    results = runner.run(adapter, planned, profile="default")
    counts = Counter(r.verdict for r in results)
    bad = [r.id for r in results if r.verdict not in ("PASS", "MISTRUSTED", "SKIP")]
    assert not bad, bad
    assert counts["PASS"] >= len(results) // 2


def test_numpy32_baseline_has_no_fail_or_error_in_float32():
    from conformance.adapters import load_adapter

    results = _run(load_adapter("numpy32"), ops=None, dtypes=("float32",), profile="quick")
    assert not [r.id for r in results if r.verdict in ("FAIL", "ERROR")]


def test_the_same_precision_baseline_evaluates_in_every_dtype():
    """A baseline that raises only drops its term from the bound, silently for the run (a bug
    once made every half-precision backward's baseline raise); so none may raise."""
    from conformance import judge
    from conformance.adapters import load_adapter

    judge.BASELINE_FAILURES.clear()
    ops = "^(batch_norm|layer_norm|group_norm|instance_norm|rms_norm|weight_norm|spectral_norm|" \
          "weight_standardization|adam|lion|cosine)$"
    results = _run(load_adapter("numpy32"), ops=ops, dtypes=("float64", "float16", "bfloat16"), profile="quick")
    assert not [r.id for r in results if r.verdict in ("FAIL", "ERROR")]
    assert not judge.BASELINE_FAILURES, judge.BASELINE_FAILURES[:5]


@pytest.mark.parametrize(
    ("adapter", "needle"),
    [
        (ha.RaisingAdapter(), "RuntimeError: kernel exploded"),
        (ha.WrongShapeAdapter(), "shape"),
        (ha.NaNAdapter(), "returned nan"),
    ],
)
def test_adapter_faults_are_errors_for_that_case_and_the_run_goes_on(adapter, needle):
    results = _run(adapter)
    errors = [r for r in results if r.verdict == "ERROR"]
    assert errors and all(needle in r.message or needle in " ".join(r.comparisons) for r in errors)
    if isinstance(adapter, ha.RaisingAdapter):
        assert {r.op for r in errors} == {"layer_norm"}
        assert all(r.verdict == "PASS" for r in results if r.op == "batch_norm")


def test_a_hanging_adapter_times_out_as_error(monkeypatch):
    quick = runner.PROFILES["quick"]
    monkeypatch.setitem(runner.PROFILES, "quick", runner.Profile("quick", quick.steps, False, False, 0, 0.2))
    results = _run(ha.HangingAdapter(), ops="^layer_norm$")
    assert len(results) > runner.MAX_CONSECUTIVE_TIMEOUTS
    assert all(r.verdict == "ERROR" for r in results)
    first = results[:runner.MAX_CONSECUTIVE_TIMEOUTS]
    assert all(r.error_kind == "timeout" and "did not answer" in r.message for r in first)
    rest = results[runner.MAX_CONSECUTIVE_TIMEOUTS:]
    assert all(r.error_kind == "aborted" and "abandoned after 3 consecutive timeouts" in r.message
               for r in rest)


def test_unsupported_values_are_skipped_with_the_reason():
    results = _run(ha.UnsupportedAdapter(), profile="default")
    skipped = [r for r in results if r.verdict == "SKIP"]
    assert skipped and all("only eps=1e-5" in r.message for r in skipped)
    assert any(r.verdict == "PASS" for r in results)


def test_an_undeclared_dtype_is_not_planned_and_the_coverage_says_so():
    adapter = ha.FlaxMomentumAdapter()
    assert runner.plan(adapter, ops="^batch_norm$", dtypes=("float32",)) == []
    cov = runner.coverage(adapter, ops="norm", dtypes=("float64", "float32"))
    assert cov.unsupported == {"batch_norm": ["float32"]}
    assert "layer_norm" in cov.not_implemented and cov.implemented == ["batch_norm"]


def test_a_known_convention_is_diagnosed_by_knob_and_value():
    results = _run(ha.FlaxMomentumAdapter(), ops="^batch_norm$")
    conventions = [r for r in results if r.verdict == "CONVENTION"]
    assert conventions, Counter(r.verdict for r in results)
    assert all(r.diagnosis == "momentum_convention='old_weight'" for r in conventions)
    assert not [r for r in results if r.verdict == "FAIL"]


def test_a_real_bug_is_fail_with_error_bound_and_repro():
    results = _run(ha.BadGradientAdapter(), ops="^batch_norm$")
    fails = [r for r in results if r.verdict == "FAIL"]
    assert fails
    r = fails[0]
    assert r.worst == "grads.x" and r.worst_ratio > 1 and r.bound > 0 and not r.diagnosis
    assert r.repro == f"normref repro {r.id}"


def test_same_seed_same_cases_same_report():
    def strip(results):
        return [{k: v for k, v in r.__dict__.items() if not k.startswith("seconds")} for r in results]

    a = _run(ha.BadGradientAdapter(), ops="^batch_norm$")
    b = _run(ha.BadGradientAdapter(), ops="^batch_norm$")
    assert strip(a) == strip(b)


def test_xfails_turn_fail_into_xfail_and_pass_into_xpass():
    xfails = {r"badgrad:batch_norm:float64:.*": "known 1% slip"}
    results = _run(ha.BadGradientAdapter(), ops="^batch_norm$", xfails=xfails)
    verdicts = Counter(r.verdict for r in results)
    assert verdicts["FAIL"] == 0 and verdicts["XFAIL"] > 0
    passing = _run(ha.OracleAdapter(), ops="^batch_norm$", xfails={r"oracle:batch_norm:.*": "x"})
    assert {r.verdict for r in passing} <= {"XPASS", "SKIP", "MISTRUSTED"}
    assert report.exit_code(passing) == 1 and report.exit_code(passing, strict_xpass=False) == 0
    ids = runner.possible_ids(ha.BadGradientAdapter(), seed=0)
    assert Xfails.from_dict({"nothing:.*": "stale", **xfails}).stale(ids) == ["nothing:.*"]


def test_reports_json_junit_markdown(tmp_path):
    results = _run(ha.BadGradientAdapter(), ops="^batch_norm$", dtypes=("float64", "float32"))
    report.to_json(results, tmp_path / "r.json", meta={"seed": 0})
    doc = json.loads((tmp_path / "r.json").read_text())
    assert len(doc["cases"]) == len(results)
    fields = {"op", "dtype", "shapes", "hparams", "dialect", "seed", "verdict", "max_abs_error",
              "max_rel_error", "bound", "worst_ratio", "framework", "normref_version", "repro"}
    assert fields <= set(doc["cases"][0])
    report.to_junit_xml(results, tmp_path / "r.xml")
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) == len(results) == len(suite.findall("testcase"))
    assert int(suite.get("failures")) == sum(r.verdict == "FAIL" for r in results) > 0
    report.to_markdown(results, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "| `batch_norm` |" in text and "normref repro" in text


def test_cli_check_exit_codes_and_outputs(tmp_path, capsys):
    path = HERE / "harness_adapters.py"
    code = main(["check", str(path), "--ops", "^batch_norm$", "--dtypes", "float64", "--profile", "quick",
                 "--json", str(tmp_path / "r.json"), "--junit-xml", str(tmp_path / "r.xml")])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out and "repro: normref repro badgrad:batch_norm:float64:" in out
    assert json.loads((tmp_path / "r.json").read_text())["cases"]
    assert main(["check", "numpy32", "--ops", "^layer_norm$", "--dtypes", "float32", "--profile", "quick"]) == 0


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["check", "no_such_adapter_xyz"], "unknown adapter 'no_such_adapter_xyz'"),
        (["check", "numpy32", "--dtypes", "float8"], "unknown dtype 'float8'"),
        (["check", "numpy32", "--ops", "^nothing$"], "matches no registered op"),
        (["check", "numpy32", "--shard", "3/2"], "--shard"),
        (["check", "numpy32", "--profile", "slow"], "invalid choice"),
        (["repro", "not-an-id"], "ADAPTER:OP:DTYPE:CASE:SEED"),
    ],
)
def test_cli_usage_errors_exit_2(capsys, argv, needle):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert needle in capsys.readouterr().err


def test_shards_partition_the_cases():
    adapter = ha.OracleAdapter()
    planned = runner.plan(adapter, ops="^layer_norm$", dtypes=("float64",), profile="quick")
    ids = [c.id(adapter.name) for c in planned]
    shards = [[c for i, c in enumerate(ids) if i % 3 == k] for k in range(3)]
    assert sorted(sum(shards, [])) == sorted(ids)


def test_repro_reruns_one_case_and_prints_both_sides(capsys):
    path = HERE / "harness_adapters.py"
    planned = runner.plan(ha.BadGradientAdapter(), ops="^batch_norm$", dtypes=("float64",), profile="quick")
    case_id = planned[0].id("badgrad")
    code = main(["repro", case_id, "--adapter", str(path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "oracle (float64)" in out and "adapter - oracle" in out and "grads.x [fail]" in out


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "pytest -n 2"])
def test_pytest_plugin_turns_cases_into_items(tmp_path, workers):
    """The CI gate: one item per case; the failing adapter's cases fail with the repro line (also
    under pytest-xdist, whose workers plan the same items)."""
    import subprocess
    import sys

    (tmp_path / "test_nothing.py").write_text("def test_placeholder():\n    pass\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "conformance.pytest_plugin", "-p", "no:cacheprovider",
           "--normref-adapter", str(HERE / "harness_adapters.py"), "--normref-ops", "^batch_norm$",
           "--normref-dtypes", "float64", "--normref-profile", "quick", "--rootdir", str(tmp_path),
           *workers, str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "normref repro badgrad:batch_norm:float64:" in proc.stdout
    planned = runner.plan(ha.BadGradientAdapter(), ops="^batch_norm$", dtypes=("float64",), profile="quick")
    summary = proc.stdout.strip().splitlines()[-1]
    assert f"{len(planned)} failed, 1 passed" in summary


def test_the_mapping_file_list_is_every_mapping_file():
    """The adapters import their per-family mapping files from an explicit list (no directory scan
    at run time): every file on disk is in it, and nothing else."""
    from conformance.adapters.mapping import EXTENSIONS

    here = Path(runner.__file__).parent / "adapters"
    for prefix, stems in EXTENSIONS.items():
        assert sorted(stems) == sorted(p.stem for p in here.glob(f"{prefix}*.py")), prefix


#: The spec dialect table each built-in mapping claims to follow (weight standardization: torch
#: has no layer, the torch adapter follows timm's StdConv2d; the JAX one deepmind's NFNets).
_TABLES = {"torch": {"weight_standardization": "timm", "msg_norm": "pyg", "evo_norm": "timm_b0"},
           "jax": {"weight_standardization": "nfnets"}}


def test_built_in_declared_conventions_agree_with_the_spec_tables():
    """A built-in adapter's declared convention is a claim about its framework; the spec's dialect
    table for that framework (read from its source) makes the same claim: they must agree, knob
    for knob, so neither drifts alone."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    from conformance.adapters import jax as jax_adapter
    from conformance.adapters import torch as torch_adapter
    from conformance.adapters.mapping import load_extensions

    declared = [("torch", op, m.dialect, _TABLES["torch"].get(op, "torch"))
                for op, m in torch_adapter.MAPPINGS.items()]
    declared += [("jax", op, m.dialect, _TABLES["jax"].get(op, "flax")) for op, m in jax_adapter.MAPPINGS.items()]
    for prefix, table in (("_torch_", "torch"), ("_optax_", "optax")):
        declared += [(prefix, op, m.dialect, table) for op, m in load_extensions(prefix).items()]
    for who, op, knobs, table in declared:
        spec = reference.get(op).spec
        assert table in spec.dialects, f"{who} {op}: the spec has no [dialects.{table}]"
        values = spec.dialects[table]["hparams"]
        differ = {k: (v, values[k]) for k, v in knobs.items() if k in values and values[k] != v}
        assert not differ, f"{who} {op}: declared vs [dialects.{table}]: {differ}"
