"""Golden vectors: ``normref export`` -> a backend's results -> ``normref judge`` gives, case by
case, what ``normref check`` gives an adapter returning those arrays (conformance/golden*.py,
conformance/replay.py).  The backend here is a Python adapter run by the results writer
(conformance/golden_writer.py), which reads only the exported files, as a C++ or Rust backend
would; examples/golden_c/ is a real one in C."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

import harness_adapters as ha
from conformance import runner
from conformance.adapters import OpSupport, Response
from conformance.adapters.numpy32 import NumPy32Adapter
from conformance.cli import main
from conformance.dtypes import DTYPES
from conformance.golden import Declaration, Golden, read_arrays, write_arrays
from conformance.golden_export import export
from conformance.golden_writer import write_results
from conformance.replay import NO_RESULT, judge

#: One xdist worker for the module: the export its tests share is made once.
pytestmark = pytest.mark.xdist_group("golden")

ROOT = Path(__file__).resolve().parents[1]
#: Timings are the only fields of a case record that may differ between two runs.
TIMINGS = ("seconds_adapter", "seconds_oracle")


def _record(result) -> dict:
    rec = {k: v for k, v in asdict(result).items() if k not in TIMINGS}
    return {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}


def _assert_same(judged, checked) -> None:
    assert [r.id for r in judged] == [r.id for r in checked]
    for j, c in zip(judged, checked, strict=True):
        assert _record(j) == _record(c), j.id


def _round_trip(adapter, tmp: Path, *, ops: str, dtypes, layout: str = "npz", writer=None, checker=None):
    """export -> results written by ``writer`` (default: the adapter) -> judge, and the check."""
    summary = export(tmp / "golden", Declaration.of(adapter), ops=ops, dtypes=dtypes, profile="quick",
                     layout=layout)
    write_results(writer or adapter, tmp / "golden", tmp / "results", layout=layout)
    judged, meta, _ = judge(tmp / "golden", tmp / "results")
    checker = checker or adapter
    checked = runner.run(checker, runner.plan(checker, ops=ops, dtypes=dtypes, profile="quick"), profile="quick")
    return summary, judged, checked


@pytest.fixture(scope="module")
def numpy32_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("numpy32")
    summary, judged, checked = _round_trip(
        NumPy32Adapter(), tmp, ops="^(layer_norm|batch_norm|adam|gradient_noise_scale)$",
        dtypes=("float32", "bfloat16"))
    return tmp, summary, judged, checked


def test_judge_equals_check_for_normalizers_optimizers_and_streams(numpy32_run):
    tmp, summary, judged, checked = numpy32_run
    _assert_same(judged, checked)
    assert {r.verdict for r in judged} <= {"PASS", "MISTRUSTED"} and "PASS" in {r.verdict for r in judged}
    golden = Golden(tmp / "golden")
    runs = {e["run"] for e in golden.cases}
    assert runs == {"steps", "trajectory"}
    # stateful normalizers run several steps; the model-source trajectories are exported too
    assert any(e["op"] == "batch_norm" and e["steps"] > 1 for e in golden.cases)
    assert summary.model_gradients == sum(e["model_gradients"] for e in golden.cases) > 0
    # bfloat16 is stored as uint16 bit patterns, and said so
    entry = next(e for e in golden.cases if e["dtype"] == "bfloat16" and e["op"] == "layer_norm")
    meta = golden.manifest(entry)["steps"][0]["given"]["inputs"]["x"]
    assert meta == {**meta, "dtype": "bfloat16", "stored_as": "uint16"}
    with np.load(tmp / "golden" / f"{entry['stem']}.npz", allow_pickle=False) as data:
        assert data["step0/inputs/x"].dtype == np.uint16
    assert "uint16" in (tmp / "golden" / "README.md").read_text()


def test_a_missing_result_is_an_error_not_a_skip(numpy32_run, tmp_path):
    tmp, _, full, _ = numpy32_run
    shutil.copytree(tmp / "results", tmp_path / "results")
    gone = next(r for r in full if r.op == "batch_norm" and r.steps > 1)
    stem = Golden(tmp / "golden").cases[[r.id for r in full].index(gone.id)]["stem"]
    (tmp_path / "results" / f"{stem}.npz").unlink()
    judged, _, _ = judge(tmp / "golden", tmp_path / "results")
    for j, f in zip(judged, full, strict=True):
        if j.id == gone.id:
            assert (j.verdict, j.error_kind) == ("ERROR", NO_RESULT) and j.message.startswith(NO_RESULT)
        else:
            assert _record(j) == _record(f)


def test_a_wrong_result_fails(numpy32_run, tmp_path):
    tmp, _, full, _ = numpy32_run
    shutil.copytree(tmp / "results", tmp_path / "results")
    golden = Golden(tmp / "golden")
    wrong = {}
    for pick in (lambda e: e["op"] == "layer_norm" and e["dtype"] == "float32",
                 lambda e: e["op"] == "adam" and e["case"] == "fixed" and e["dtype"] == "float32"):
        entry = next(e for e in golden.cases if pick(e))
        arrays = read_arrays(tmp_path / "results" / entry["stem"], entry["dtype"])
        key = next(k for k in arrays if k.startswith(f"step{entry['steps'] - 1}/outputs/"))
        arrays[key] = (arrays[key] * np.float32(1.001)).astype(arrays[key].dtype)
        (tmp_path / "results" / f"{entry['stem']}.npz").unlink()
        write_arrays(tmp_path / "results" / entry["stem"], arrays, "npz")
        wrong[entry["id"]] = key
    judged, _, _ = judge(tmp / "golden", tmp_path / "results")
    for r in judged:
        if r.id in wrong:
            assert r.verdict == "FAIL" and r.worst == wrong[r.id].split("/", 1)[1].replace("/", ".", 1), r
    assert sum(r.verdict == "FAIL" for r in judged) == len(wrong)


def test_a_request_that_was_not_exported_is_refused(numpy32_run, tmp_path):
    """Each step's request is checked against the exported one: an export that differs from what
    the harness asks (here: step 2 of a BatchNorm case edited) makes that case ERROR, naming it."""
    tmp, _, full, _ = numpy32_run
    shutil.copytree(tmp / "golden", tmp_path / "golden")
    golden = Golden(tmp_path / "golden")
    entry = next(e for e in golden.cases if e["op"] == "batch_norm" and e["steps"] > 2)
    path = tmp_path / "golden" / f"{entry['stem']}.json"
    manifest = json.loads(path.read_text())
    manifest["steps"][2]["key"] = "0" * 40
    path.write_text(json.dumps(manifest))
    judged, _, _ = judge(tmp_path / "golden", tmp / "results")
    bad = next(r for r in judged if r.id == entry["id"])
    assert bad.verdict == "ERROR" and bad.step == 2 and "ReplayMismatch" in bad.message, bad
    assert [_record(r) for r in judged if r.id != entry["id"]] == [_record(r) for r in full if r.id != entry["id"]]


@pytest.mark.parametrize("adapter", [ha.RaisingAdapter(), ha.UnsupportedAdapter(), ha.NaNAdapter(),
                                     ha.FlaxMomentumAdapter(), ha.ForwardOnlyAdapter()], ids=lambda a: a.name)
def test_errors_skips_conventions_and_forward_only_replay_exactly(adapter, tmp_path):
    _, judged, checked = _round_trip(adapter, tmp_path, ops="^(batch_norm|layer_norm)$",
                                     dtypes=("float64", "float32"))
    _assert_same(judged, checked)
    verdicts = {r.verdict for r in judged}
    expected = {"raising": "ERROR", "unsupported": "SKIP", "nan": "ERROR", "flaxmomentum": "CONVENTION",
                "forward": "PASS"}[adapter.name]
    assert expected in verdicts, verdicts
    if adapter.name == "forward":
        assert not any(r.gradients_checked for r in judged)


class _OwnDraws(NumPy32Adapter):
    """InfoBatch with its own draws (a seeded stream: the writer's run and the check's draw alike)."""

    name = "own-draws"

    def __init__(self) -> None:
        super().__init__()
        self.rng = np.random.default_rng(7)

    def ops(self):
        return {"infobatch": OpSupport({}, DTYPES, "test", takes_draws=False)}

    def evaluate(self, op, request):
        scores = np.asarray(request.inputs["scores"])
        u = self.rng.random(scores.shape).astype(scores.dtype)
        given = type(request)(request.op, request.dtype, {"scores": scores, "u": u}, None, request.hparams, None)
        return Response(outputs={"weights": super().evaluate(op, given).outputs["weights"]})


def test_a_sampler_writes_its_samples_and_is_judged_in_distribution(tmp_path, monkeypatch):
    # 200 draws per case instead of 2000 (a wider Hoeffding bound, the same machinery)
    monkeypatch.setitem(runner.PROFILES, "quick", replace(runner.PROFILES["quick"], draw_samples=200))
    _, judged, checked = _round_trip(_OwnDraws(), tmp_path, ops="^infobatch$", dtypes=("float32",),
                                     writer=_OwnDraws(), checker=_OwnDraws())
    _assert_same(judged, checked)
    assert {r.verdict for r in judged} == {"PASS"}
    assert all(r.steps == 200 for r in judged)


def test_torch_judge_equals_check(tmp_path):
    pytest.importorskip("torch")
    from conformance.adapters import load_adapter

    adapter = load_adapter("torch")
    # torch's SGD keeps no step count (supplied by the harness, not compared)
    _, judged, checked = _round_trip(adapter, tmp_path, ops="^(layer_norm|sgd)$",
                                     dtypes=("float32", "bfloat16"), layout="npy-dir")
    _assert_same(judged, checked)
    assert any(r.not_compared for r in judged)


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------


def _html() -> bool:
    import importlib.util

    return importlib.util.find_spec("conformance.html_report") is not None


def test_cli_export_judge_and_their_exit_codes(tmp_path, capsys):
    select = ["--ops", "^layer_norm$", "--dtypes", "float32", "--profile", "quick", "--jobs", "1"]
    golden, results = tmp_path / "golden", tmp_path / "results"
    assert main(["export", str(golden), "--adapter", "numpy32", *select]) == 0
    assert "written to" in capsys.readouterr().out
    assert main(["export", str(golden), *select]) == 2          # not empty: nothing overwritten
    assert "not an empty directory" in capsys.readouterr().err
    write_results(NumPy32Adapter(), golden, results)
    html = ["--html", str(tmp_path / "j.html")] if _html() else []
    reports = ["--json", str(tmp_path / "j.json"), "--junit-xml", str(tmp_path / "j.xml"), "--markdown",
               str(tmp_path / "j.md")]
    assert main(["judge", str(golden), str(results), "--jobs", "1", *reports, *html]) == 0
    assert main(["check", "numpy32", *select, "--json", str(tmp_path / "c.json")]) == 0
    capsys.readouterr()
    j, c = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("j", "c"))
    assert [{k: v for k, v in r.items() if k not in TIMINGS} for r in j["cases"]] == \
        [{k: v for k, v in r.items() if k not in TIMINGS} for r in c["cases"]]
    assert {k: j[k] for k in ("seed", "profile", "dtypes", "ops", "coverage")} == \
        {k: c[k] for k in ("seed", "profile", "dtypes", "ops", "coverage")}
    assert (tmp_path / "j.xml").is_file() and (tmp_path / "j.md").is_file()
    if html:
        assert "<html" in (tmp_path / "j.html").read_text().lower()
    # usage errors, before anything runs
    assert main(["judge", str(tmp_path), str(results)]) == 2                     # not an export
    assert main(["judge", str(golden), str(tmp_path / "nowhere")]) == 2          # no RESULTS folder
    assert main(["judge", str(golden), str(results), "--json", str(tmp_path / "no/such/dir/r.json")]) == 2
    declare = tmp_path / "declare.json"
    declare.write_text(json.dumps({"name": "c", "ops": {"layer_norm": {"dtypes": ["float32"],
                                                                       "dialect": {"epsilon": 1e-5}}}}))
    assert main(["export", str(tmp_path / "g2"), "--declare", str(declare), *select]) == 2
    assert "unknown knob 'epsilon'" in capsys.readouterr().err
    declare.write_text(json.dumps({"name": "c", "ops": {"layer_norm": {"dtypes": ["float32"]}}}))
    assert main(["export", str(tmp_path / "g3"), "--declare", str(declare), "--ops", "^batch_norm$"]) == 3
    assert not (tmp_path / "g3").exists()
    assert "nothing to export" in capsys.readouterr().err


@pytest.mark.skipif(not _html(), reason="conformance/html_report.py is not there yet")
def test_check_and_merge_write_html(tmp_path):
    select = ["--ops", "^layer_norm$", "--dtypes", "float32", "--profile", "quick", "--jobs", "1"]
    part = str(tmp_path / "c.json")
    assert main(["check", "numpy32", *select, "--json", part, "--html", str(tmp_path / "c.html")]) == 0
    assert main(["merge", part, "--html", str(tmp_path / "m.html")]) == 0
    assert all("<html" in (tmp_path / n).read_text().lower() for n in ("c.html", "m.html"))
    assert main(["check", "numpy32", *select, "--html", str(tmp_path / "none" / "c.html")]) == 2


def test_the_c_example_is_judged(tmp_path, capsys):
    """examples/golden_c/run.sh: export layer_norm (npy-dir), build the C LayerNorm, run it, judge."""
    normref = Path(sys.executable).with_name("normref")
    if not (shutil.which("gcc") and shutil.which("make") and normref.is_file()):
        pytest.skip("needs gcc, make and the normref script")
    done = subprocess.run(["bash", str(ROOT / "examples/golden_c/run.sh"), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "NORMREF": str(normref), "NORMREF_JOBS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    cases = json.loads((tmp_path / "report.json").read_text())["cases"]
    assert cases and {c["verdict"] for c in cases} == {"PASS"} and not any(c["gradients_checked"] for c in cases)
    # the judge catches a wrong C result: y of one case scaled by 1.001
    stem = Golden(tmp_path / "golden").cases[0]["stem"]
    path = tmp_path / "results" / stem / "step0" / "outputs" / "y.npy"
    np.save(path, np.load(path) * np.float32(1.001))
    assert main(["judge", str(tmp_path / "golden"), str(tmp_path / "results"), "--jobs", "1"]) == 1
    assert "FAIL  golden_c:layer_norm:float32:" in capsys.readouterr().out
