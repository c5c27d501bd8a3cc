"""Scaling out: ``--jobs N`` gives the report of one process; ``normref merge`` joins shards."""

from __future__ import annotations

import json
import os

from conformance import report
from helpers import run_cli

OPS = "^(layer_norm|batch_norm|sgd|cosine)$"


def _cases(path):
    """The case records of a JSON report, timings aside."""
    return [{k: v for k, v in r.items() if not k.startswith("seconds")}
            for r in json.loads(path.read_text())["cases"]]


def test_jobs_give_the_report_of_one_process(tmp_path, capsys):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    base = ["check", "numpy32", "--profile", "quick", "--ops", OPS, "--dtypes", "float64,float16"]
    assert run_cli([*base, "--json", str(one)], capsys)[0] == 0
    assert run_cli([*base, "--json", str(two), "--jobs", "2"], capsys)[0] == 0
    assert len(_cases(one)) > 20
    assert _cases(one) == _cases(two)  # same cases, same order, same verdicts, errors and bounds


def test_a_worker_that_dies_makes_its_cases_error_and_the_run_goes_on(tmp_path, capsys):
    adapter = tmp_path / "dying.py"
    adapter.write_text(
        "import os\n"
        "import harness_adapters as ha\n"
        "class Dying(ha._Faulty):\n"
        "    name = 'dying'\n"
        "    def evaluate(self, op, request):\n"
        "        if op == 'layer_norm':\n"
        "            os._exit(3)  # a segfault inside the framework, say\n"
        "        return super().evaluate(op, request)\n"
        "ADAPTER = Dying()\n")
    out = tmp_path / "r.json"
    code, _, _ = run_cli(["check", str(adapter), "--profile", "quick", "--dtypes", "float64", "--jobs", "2",
                       "--json", str(out)], capsys)
    assert code == 1
    cases = _cases(out)
    died = [c for c in cases if c["op"] == "layer_norm"]
    assert died and all(c["verdict"] == "ERROR" and c["error_kind"] == "crashed" for c in died)
    assert "failed twice" in died[0]["message"]
    assert {c["verdict"] for c in cases if c["op"] == "batch_norm"} == {"PASS"}


def test_jobs_must_be_positive(capsys, monkeypatch):
    code, _, err = run_cli(["check", "numpy32", "--jobs", "0"], capsys)
    assert code == 2 and "must be > 0" in err
    monkeypatch.setenv("NORMREF_JOBS", "many")
    code, _, err = run_cli(["check", "numpy32"], capsys)
    assert code == 2 and "NORMREF_JOBS must be a positive int or 'auto', got 'many'" in err


def test_the_default_is_one_worker_per_core_and_no_more_than_the_work(monkeypatch):
    from conformance import planning
    from conformance.adapters import load_adapter
    from conformance.cli import _workers

    planned = planning.plan(load_adapter("numpy32"), ops="^(layer_norm|adam)$", dtypes=("float64", "float32"),
                            seed=0, profile="quick")
    monkeypatch.delenv("NORMREF_JOBS")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert _workers(None, planned) == min(cores, 4)      # 2 ops x 2 dtypes
    assert _workers(None, planned[:1]) == 1
    assert _workers(3, planned) == 3
    monkeypatch.setenv("NORMREF_JOBS", "1")
    assert _workers(None, planned) == 1


def _shards(tmp_path, capsys, n=3, seed="0"):
    paths = []
    for k in range(1, n + 1):
        path = tmp_path / f"part{k}-{seed}.json"
        code, _, _ = run_cli(["check", "numpy32", "--profile", "quick", "--ops", OPS, "--dtypes", "float64",
                           "--seed", seed, "--shard", f"{k}/{n}", "--json", str(path)], capsys)
        assert code == 0
        paths.append(str(path))
    return paths


def test_merged_shards_are_the_whole_run(tmp_path, capsys):
    whole, merged = tmp_path / "whole.json", tmp_path / "merged.json"
    assert run_cli(["check", "numpy32", "--profile", "quick", "--ops", OPS, "--dtypes", "float64",
                 "--json", str(whole)], capsys)[0] == 0
    parts = _shards(tmp_path, capsys)
    code, out, _ = run_cli(["merge", *parts, "--json", str(merged), "--junit-xml", str(tmp_path / "m.xml")],
                        capsys)
    assert code == 0 and "totals:" in out
    by_id = {c["id"]: c for c in _cases(merged)}
    assert by_id == {c["id"]: c for c in _cases(whole)}
    assert json.loads(merged.read_text())["summary"] == json.loads(whole.read_text())["summary"]
    assert (tmp_path / "m.xml").read_text().count("<testcase") == len(by_id)


def test_merge_refuses_parts_of_different_runs(tmp_path, capsys):
    parts = _shards(tmp_path, capsys)
    other = _shards(tmp_path, capsys, seed="1")
    not_json = tmp_path / "x.json"
    not_json.write_text("{}")
    for argv, needle in [
        ([parts[0], parts[2]], "missing shard 2/3 (given 1/3, 3/3)"),
        ([*parts, parts[1]], "a shard is given twice"),
        ([parts[0], other[1], parts[2]], "seed is 1, not 0"),
        ([*parts, str(not_json)], "not a normref JSON report"),
        ([str(tmp_path / "absent.json")], "not a readable JSON report"),
    ]:
        code, _, err = run_cli(["merge", *argv], capsys)
        assert code == 2 and needle in err, (argv, err)


def test_a_failing_case_survives_the_round_trip_through_json(tmp_path):
    from conformance.runner import CaseResult

    failing = CaseResult("a:op:float64:c:0", "a", "op", "float64", "c", 0, "FAIL", worst_ratio=float("inf"),
                         max_abs_error=float("nan"), comparisons=["outputs.y: ratio inf"])
    path = tmp_path / "r.json"
    report.to_json([failing], path, meta={"seed": 0})
    meta, [back] = report.read_json(path)
    assert meta == {"seed": 0}
    assert back.worst_ratio == float("inf") and back.verdict == "FAIL" and back.comparisons == failing.comparisons
    assert report.exit_code([back]) == report.EXIT_FAILED


