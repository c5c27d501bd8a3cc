"""The trajectory harness for optimizers: free-running comparison, accumulated bounds, faults,
dialect diagnosis, selection by family."""

from __future__ import annotations

import numpy as np
import pytest

import reference
from conformance import judge, memo, runner, step_sources, trajectory
from conformance.adapters import OpSupport, Request, Response
from conformance.adapters.numpy32 import NumPy32Adapter


class _Float32Oracle(NumPy32Adapter):
    """The oracle's own step in float32: a correct float32 implementation."""

    name = "oracle32"

    def ops(self):
        return {op: OpSupport(dialect={}, dtypes=("float32",)) for op in reference.ops("optimizers")}


def _plan(adapter, op, profile="default", dtypes=("float32",)):
    return runner.plan(adapter, ops=f"^{op}$", dtypes=list(dtypes), profile=profile)


def test_schedules_and_sources_are_deterministic():
    assert trajectory.schedule_multipliers("drop", 6) == [1, 1, 1, 0.1, 0.1, 0.1]
    assert trajectory.schedule_multipliers("warmup", 8) == [0.5, 1, 1, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="unknown schedule"):
        trajectory.schedule_multipliers("cosine-ish", 3)
    shapes = {"w": (3, 2), "b": (3,)}
    a = trajectory.GradientSource("fixed", shapes, 0, "adam", "c")(None, 4)
    b = trajectory.GradientSource("fixed", shapes, 0, "adam", "c")(None, 4)
    assert all(np.array_equal(a[p], b[p]) for p in shapes)
    zero = trajectory.GradientSource("fixed", shapes, 0, "adam", "c", family="zero_tensor")(None, 1)
    assert not np.any(zero["b"]) and np.all(zero["w"] != 0)


def test_model_gradients_are_the_gradients_of_their_losses():
    """The quadratic and Rosenbrock sources against central differences of their losses."""
    rng = np.random.default_rng(0)
    w = {"w": 1.0 + 0.1 * rng.standard_normal((2, 3))}
    rosen = trajectory.GradientSource("rosenbrock", {"w": (2, 3)}, 0, "x", "c")
    quad = trajectory.GradientSource("quadratic", {"w": (2, 3)}, 0, "x", "c")

    def rosen_loss(x):
        x = x.reshape(-1)
        return np.sum(step_sources.ROSENBROCK_A * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)

    def quad_loss(x):
        return 0.5 * np.sum(quad.curvature["w"] * (x - quad.center["w"]) ** 2)

    for source, loss in ((rosen, rosen_loss), (quad, quad_loss)):
        g = source(w, 0)["w"]
        h = 1e-6
        for i in np.ndindex(2, 3):
            e = np.zeros((2, 3))
            e[i] = h
            fd = (loss(w["w"] + e) - loss(w["w"] - e)) / (2 * h)
            assert abs(fd - g[i]) <= 1e-6 * max(1.0, abs(g[i]))


def test_a_correct_float32_step_passes_every_default_case():
    adapter = _Float32Oracle()
    for op in ("sgd", "adam", "adamw"):
        results = runner.run(adapter, _plan(adapter, op))
        assert {r.verdict for r in results} <= {"PASS", "MISTRUSTED"}, [(r.case, r.verdict, r.message)
                                                                        for r in results]
        assert sum(r.verdict == "PASS" for r in results) >= len(results) // 2


def test_the_accumulated_bound_is_needed_over_long_trajectories(monkeypatch):
    """200 float32 steps of a correct SGD: the single-step bounds alone are exceeded (errors
    accumulate: the free-running comparison leaves them after step 20, and only the check from the
    adapter's own state keeps the case from FAILing); with the propagated term it passes."""
    adapter = _Float32Oracle()
    planned = [p for p in _plan(adapter, "sgd", profile="thorough") if p.name == "momentum_fixed"]
    with_propagation = runner.run(adapter, planned, profile="thorough")[0]
    assert with_propagation.verdict == "PASS", with_propagation.message
    monkeypatch.setattr(trajectory, "propagate",
                        lambda *a, center, **k: {key: np.zeros(np.shape(v)) for key, v in center.items()})
    memo.clear()  # the oracle's trajectory above was kept with its propagated bounds
    local_only = runner.run(adapter, planned, profile="thorough")[0]
    assert local_only.verdict == "MISTRUSTED" and local_only.step > 20, local_only.message
    assert "left its propagated bound" in local_only.message


class _WrongFromStep(_Float32Oracle):
    """Correct until ``start``, then every update ``factor`` times too long: a wrong step, late."""

    name = "late"

    def __init__(self, start: int, dtype: str = "float32", factor: float = 1.001) -> None:
        self.start, self.dtype, self.factor = start, dtype, factor

    def ops(self):
        return {op: OpSupport(dialect={}, dtypes=(self.dtype,)) for op in reference.ops("optimizers")}

    def evaluate(self, op, request):
        response = super().evaluate(op, request)
        if float(request.state.get("step", 0)) >= self.start:
            for key, new in response.outputs.items():
                old = np.asarray(request.inputs[key], dtype=np.float64)
                moved = old + (np.asarray(new, dtype=np.float64) - old) * self.factor
                response.outputs[key] = moved.astype(np.asarray(new).dtype)
        return response


def test_a_wrong_step_fails_after_the_trajectory_left_its_bound(monkeypatch):
    """With the free-running bound out of the way (no propagation), every step is judged from the
    adapter's own state: a step that goes wrong late still FAILs, at that step."""
    monkeypatch.setattr(trajectory, "propagate",
                        lambda *a, center, **k: {key: np.zeros(np.shape(v)) for key, v in center.items()})
    adapter = _WrongFromStep(150)
    planned = [p for p in _plan(adapter, "sgd", profile="thorough") if p.name == "momentum_fixed"]
    result = runner.run(adapter, planned, profile="thorough")[0]
    assert result.verdict == "FAIL" and result.step >= 150, result.message
    first = next(line for line in result.comparisons if "[fail]" in line)
    assert first.startswith("step 150:"), first
    assert "judged from the adapter's own parameters and state" in result.message


def test_float16_trajectories_of_a_correct_step_are_never_fail():
    """The same-precision baseline in float16 on the cases whose free-running bound it once exceeded
    (AdamP's projection threshold, AdaGrad's second moment at the subnormal floor, Lion's sign):
    MISTRUSTED or PASS; the same step made 50% long from step 5 on FAILs (a 0.1% longer update
    is below float16's resolution of the parameters)."""
    from conformance.adapters import load_adapter

    numpy32 = load_adapter("numpy32")
    for op, name in (("adamp", "grad-sparse@fixed_decay"), ("adagrad", "grad-tiny@fixed"),
                     ("lion", "grad-tiny@fixed"), ("adamw", "grad-mixed_scales@fixed")):
        case = runner.find_case(op, name, 0, "float16", "default")
        assert runner.run_case(numpy32, case).verdict in ("PASS", "MISTRUSTED"), (op, name)
    wrong = _WrongFromStep(5, "float16", factor=1.5)
    case = runner.find_case("adamp", "grad-sparse@fixed_decay", 0, "float16", "default")
    assert runner.run_case(wrong, case).verdict == "FAIL"


def test_the_bound_grows_with_curvature_and_forgets_through_an_ema():
    """B_{k+1} = b_k + |J| B_k: the quadratic's 1 - lr a factor and the EMA's beta shape it."""
    op = reference.get("sgd")
    shapes = {"w": (50,)}
    source = trajectory.GradientSource("fixed", shapes, 0, "sgd", "t")
    initial = {"params/w": np.ones(50)}
    hps = [op.spec.resolve({"lr": 0.1, "momentum": 0.9})] * 6
    state0 = op.init_state(initial, **hps[0])

    def baseline(hp, arrays):
        return {}

    steps = trajectory.oracle_trajectory(op, hps, initial, state0, source, "float32", 0, baseline,
                                         lambda hp: judge.oracle(op, hp))
    grow = [float(np.max(s.bounds["state.momentum_buffer/w"])) for s in steps]
    assert all(b2 > b1 for b1, b2 in zip(grow, grow[1:], strict=False)), grow  # errors are carried


class _Raises(_Float32Oracle):
    name = "raises"

    def evaluate(self, op, request):
        if float(request.state.get("step", 0)) >= 3:
            raise RuntimeError("boom at step 3")
        return super().evaluate(op, request)


class _Drops(_Float32Oracle):
    name = "drops"

    def evaluate(self, op, request):
        response = super().evaluate(op, request)
        return Response(outputs=response.outputs, state={k: v for k, v in response.state.items()
                                                         if not k.startswith("exp_avg_sq")})


def test_adapter_faults_are_errors_of_their_case_and_the_run_goes_on():
    raised = runner.run(_Raises(), _plan(_Raises(), "adam"))
    assert {r.verdict for r in raised} == {"ERROR"}
    assert all("boom at step 3" in r.message and r.step == 3 for r in raised)
    dropped = runner.run(_Drops(), _plan(_Drops(), "adam")[:2])
    assert {r.verdict for r in dropped} == {"ERROR"}
    assert all("exp_avg_sq" in r.worst for r in dropped)


def test_ops_pattern_selects_a_family():
    adapter = _Float32Oracle()
    chosen = {p.op for p in runner.plan(adapter, ops="optim", dtypes=["float32"], profile="quick")}
    assert chosen == set(reference.ops("optimizers"))
    assert not {p.op for p in runner.plan(adapter, ops="normalizers", dtypes=["float32"],
                                          profile="quick")} & chosen


def test_torch_adam_declared_keras_is_a_convention_not_a_fail():
    """torch.optim.Adam presented as the Keras form (eps-hat) is diagnosed: it behaves as
    adam_eps_mode='corrected'."""
    pytest.importorskip("torch")
    from conformance.adapters import load_adapter

    torch_adapter = load_adapter("torch")

    class TorchAdamAsKeras:
        name = "torch-as-keras"

        def info(self):
            return torch_adapter.info()

        def ops(self):
            keras = reference.get("adam").spec.dialects["keras"]["hparams"]
            return {"adam": OpSupport(dialect={k: v for k, v in keras.items() if k != "weight_decay_mode"},
                                      dtypes=("float64",))}

        def evaluate(self, op, request):
            hp = {**request.hparams, "adam_eps_mode": "corrected"}  # torch's, whatever is declared
            return torch_adapter.evaluate(op, Request(op, request.dtype, request.inputs, request.state,
                                                      hp, None))

    adapter = TorchAdamAsKeras()
    planned = [p for p in _plan(adapter, "adam", dtypes=("float64",))
               if p.name in ("fixed", "large_eps", "grad-tiny@fixed")]
    results = runner.run(adapter, planned)
    assert {r.verdict for r in results} == {"CONVENTION"}, [(r.case, r.verdict, r.message) for r in results]
    assert {r.diagnosis for r in results} == {"adam_eps_mode='corrected'"}
