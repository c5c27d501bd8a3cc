"""Shared test machinery: VJP checks for registry ops, mpmath references, torch access.

Every op's tests reuse these instead of writing their own loops.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import reference
from conformance import check_hvp, check_vjp

# ------------------------------------------------------------------------------------------
# VJPs of registry ops against finite differences
# ------------------------------------------------------------------------------------------


def op_functions(op_name: str, state: dict | None, hparams: dict[str, Any]):
    """``(f, vjp)`` over a dict of inputs, in the form conformance.gradcheck expects."""
    op = reference.get(op_name)

    def f(inputs):
        outputs, _ = op.apply(inputs, state, **hparams)
        return {k: outputs[k] for k in sorted(outputs)}

    def vjp(inputs, cotangent):
        return op.vjp(inputs, state, cotangent, **hparams)

    return f, vjp


def assert_vjp(
    op_name: str,
    inputs: dict[str, np.ndarray],
    state: dict | None = None,
    *,
    rtol: float = 1e-8,
    second_order: bool = False,
    **hparams: Any,
):
    """The op's VJP for every differentiable input passes check_vjp at ``rtol`` (float64).

    ``second_order`` also checks that the VJP is a gradient field (symmetric FD Hessian).
    """
    op = reference.get(op_name)
    wrt = [k for k in op.spec.differentiable if inputs.get(k) is not None]
    f, vjp = op_functions(op_name, state, hparams)

    def vjp_full(x, u):
        grads = vjp(x, u)
        return {k: grads.get(k, np.zeros_like(v)) for k, v in x.items()}

    result = check_vjp(f, vjp_full, inputs, wrt=wrt, rtol=rtol, directions=3)
    assert result.max_relative_error <= rtol
    if second_order:
        rng = np.random.default_rng(1)
        u = {k: rng.standard_normal(np.shape(v)) for k, v in f(inputs).items()}
        check_hvp(lambda x: vjp_full(x, u), inputs, wrt=wrt, rtol=1e-6)
    return result


# ------------------------------------------------------------------------------------------
# mpmath references: object arrays of mpf, so the reference reads like NumPy
# ------------------------------------------------------------------------------------------

MP_DPS = 50


def mp():
    import mpmath

    mpmath.mp.dps = MP_DPS
    return mpmath


def mp_array(x: np.ndarray) -> np.ndarray:
    """Exact conversion of float64 values to mpf (object array)."""
    mpmath = mp()
    return np.vectorize(lambda v: mpmath.mpf(float(v)), otypes=[object])(np.asarray(x, dtype=np.float64))


def mp_mean(a: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod([a.shape[i] for i in axes]))
    return np.sum(a, axis=axes, keepdims=True) / n


def mp_var(a: np.ndarray, axes: tuple[int, ...], correction: int = 0) -> np.ndarray:
    n = int(np.prod([a.shape[i] for i in axes]))
    c = a - mp_mean(a, axes)
    return np.sum(c * c, axis=axes, keepdims=True) / (n - correction)


def mp_sqrt(a: np.ndarray) -> np.ndarray:
    mpmath = mp()
    return np.vectorize(mpmath.sqrt, otypes=[object])(a)


def mp_to_float(a: np.ndarray) -> np.ndarray:
    return np.vectorize(float, otypes=[np.float64])(a)


def relative_error(approx: np.ndarray, exact_mp: np.ndarray) -> float:
    """max |approx - exact| / max |exact| (inf-norm relative error), evaluated in mpmath."""
    mpmath = mp()
    diff = np.abs(mp_array(approx) - exact_mp)
    scale = max(np.abs(exact_mp).ravel(), default=mpmath.mpf(0))
    worst = max(diff.ravel(), default=mpmath.mpf(0))
    if scale == 0:
        return float(worst)
    return float(worst / scale)


# ------------------------------------------------------------------------------------------
# PyTorch
# ------------------------------------------------------------------------------------------


def torch_or_skip():
    """The torch module (float64 tests), or skip the test when torch is not installed."""
    return pytest.importorskip("torch")


def t64(x: np.ndarray, requires_grad: bool = False):
    torch = torch_or_skip()
    return torch.tensor(np.asarray(x, dtype=np.float64), dtype=torch.float64, requires_grad=requires_grad)


def torch_vjp(outputs, inputs: dict, cotangent: np.ndarray) -> dict[str, np.ndarray]:
    """Gradients of <cotangent, outputs> w.r.t. the given torch leaf tensors, as NumPy."""
    torch = torch_or_skip()
    names = [k for k, v in inputs.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(outputs, [inputs[k] for k in names], t64(cotangent))
    return {k: g.detach().numpy() for k, g in zip(names, grads, strict=True)}


# -- mutant catalogues (tests/test_mutants.py, tests/test_optimizer_mutants.py) -------------------

MUTANT_SEED = 0
MUTANT_PROFILE = "default"


def run_mutant(adapter: Any, *, diagnose_fail: bool = True) -> tuple[list, list]:
    """Plan and run an adapter's one op exactly as ``normref check`` would (default profile, seed 0)."""
    from conformance import runner

    planned = runner.plan(adapter, ops=f"^{adapter.op}$", dtypes=list(adapter.dtypes), seed=MUTANT_SEED,
                          profile=MUTANT_PROFILE)
    return planned, runner.run(adapter, planned, profile=MUTANT_PROFILE, diagnose_fail=diagnose_fail)


def flagged_cases(adapter: Any) -> tuple[int, list]:
    """How many of the adapter's cases ``normref check`` would leave FAIL or ERROR, counted up to
    MIN_FLAGGED, and the results of the cases run.

    The same count as running everything, for less: the planned cases (default profile, seed 0,
    in ``normref check``'s order) are run one by one, each exactly as the check runs it (a FAIL
    with its diagnosis, which may explain it as a CONVENTION), until MIN_FLAGGED of them stand; a
    case's verdict depends only on the case.  An adapter flagged fewer times (a control) runs
    every case.
    """
    from conformance import runner

    planned = runner.plan(adapter, ops=f"^{adapter.op}$", dtypes=list(adapter.dtypes), seed=MUTANT_SEED,
                          profile=MUTANT_PROFILE)
    flagged, results = 0, []
    for case in planned:
        if flagged >= MIN_FLAGGED:
            break
        results.append(runner.run_case(adapter, case, profile=MUTANT_PROFILE))
        flagged += results[-1].verdict in ("FAIL", "ERROR")
    return flagged, results


def verdict_table(results: list) -> str:
    return "\n".join(f"  {r.case:44s} {r.dtype:8s} {r.verdict:10s} {r.diagnosis or r.message[:110]}"
                     for r in results)


def expected_change(mutant: Any) -> dict[str, Any]:
    """``{"knob": value}`` from the catalogue's ``"knob=value"``, typed as the op's dialect knob; for
    ``"the NAME dialect"``, the convention switches of that dialect row that differ from the
    mutant's declared dialect."""
    from conformance import diagnose, runner

    text = mutant.expect[1]
    if text.startswith("the ") and text.endswith(" dialect"):
        spec = reference.get(mutant.op).spec
        row = spec.dialects[text[len("the "):-len(" dialect")]]["hparams"]
        change = {k: v for k, v in row.items() if k in spec.hparams and diagnose.is_switch(spec.hparams[k])
                  and k not in diagnose.LAYOUT_KNOBS and v != mutant.dialect.get(k, spec.hparams[k].default)}
        assert len(change) >= 2, f"{text} differs from {mutant.dialect} in fewer than two switches"
        return change
    knob, value = text.split("=", 1)
    candidates = runner.dialect_knobs(mutant.op).get(knob, [])
    values = [v for v in candidates if str(v) == value]
    assert values, f"{knob}={value} is not a dialect knob value of {mutant.op}: {candidates}"
    return {knob: values[0]}


def names_expected(result: Any, mutant: Any, *, exactly: bool = False) -> bool:
    """Whether a CONVENTION result's diagnosis is the one the mutant expects.  For a dialect row,
    a smaller row whose knobs the mutant also changes is right too on a case that cannot tell them
    apart (no weight decay, so the weight-decay knob is moot); ``exactly`` asks for the row itself."""
    expected = mutant.expect[1]
    if expected.startswith("the ") and expected.endswith(" dialect"):
        if result.diagnosis.startswith(expected + " ("):
            return True
        change = expected_change(mutant)
        return not exactly and bool(result.convention) and all(
            change.get(k, object()) == v for k, v in result.convention.items())
    return result.diagnosis.replace("'", "") == expected


#: A public mutant must be flagged by at least this many cases: one edit of a case list must not
#: lose it silently.
MIN_FLAGGED = 2


# ------------------------------------------------------------------------------------------
# The command line, in process
# ------------------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    """``normref ARGV`` run in this process: (exit status, stdout, stderr)."""
    from conformance.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err
