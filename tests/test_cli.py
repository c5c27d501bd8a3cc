"""The normref CLI: list, show, help, and one-line usage errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import reference
from conformance.cli import main


def test_list_json_has_the_documented_fields(capsys):
    assert main(["list", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in records] == reference.ops()
    for r in records:
        assert {"name", "family", "spec", "backward"} <= set(r)
        assert r["spec"].endswith(f"{r['name']}.toml")


def test_list_table(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["op", "family", "backward"]
    assert "batch_norm" in out


@pytest.mark.parametrize("name", reference.ops())
def test_show_prints_citation_hparams_and_dialects(capsys, name):
    assert main(["show", name]) == 0
    out = capsys.readouterr().out
    spec = reference.get(name).spec
    assert spec.citation.title in out and spec.citation.equations in out
    for key in spec.hparams:
        assert key in out
    for dialect in spec.dialects:
        assert dialect in out
    assert main(["show", name, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["hparams"]) == set(spec.hparams)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["show", "batch_nrom"], "unknown op 'batch_nrom'"),
        (["list", "--bogus"], "unrecognized arguments: --bogus"),
        (["show"], "the following arguments are required: name"),
        (["check", "numpy32", "--oracle-device", "gpu"], "invalid choice: 'gpu'"),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, argv, needle):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("verb", [[], ["list"], ["show"]])
def test_help_on_every_verb(capsys, verb):
    with pytest.raises(SystemExit) as info:
        main([*verb, "--help"])
    assert info.value.code == 0
    assert "usage: normref" in capsys.readouterr().out


def test_help_does_not_import_heavy_frameworks():
    code = (
        "import sys; from conformance.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'jax', 'cupy', 'scipy.stats') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_an_oracle_device_that_cannot_run_is_a_usage_error(capsys, monkeypatch):
    """--oracle-device cuda without CuPy or a GPU, or a bad $NORMREF_BACKEND: one line, exit 2,
    before any case runs."""
    import importlib.util

    if importlib.util.find_spec("cupy") is not None:
        cupy = pytest.importorskip("cupy")
        if cupy.cuda.is_available():
            pytest.skip("a GPU is present: --oracle-device cuda can run")
    monkeypatch.delenv("NORMREF_BACKEND", raising=False)
    assert main(["check", "numpy32", "--ops", "^layer_norm$", "--oracle-device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--oracle-device cuda" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("NORMREF_BACKEND", "bogus")
    assert main(["check", "numpy32", "--ops", "^layer_norm$"]) == 2
    assert "NORMREF_BACKEND='bogus'" in capsys.readouterr().err
