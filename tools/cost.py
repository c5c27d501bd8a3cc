"""How the cost of checking one case grows: with the input size, and with an optimizer's T.

The harness's work per case is a fixed number of oracle evaluations (the probes of the error
model, the float32 baseline, the adapter's own call), each linear in the number of elements for
the elementwise and reduction ops normref holds; a trajectory repeats that per step.  So the
expected growth is linear in both: doubling the input (or T) should double the time, a slope of
1 on a log-log scale.  This tool measures it for the ``numpy32`` adapter (no framework) in one
run and prints, per row, the seconds, the ratio to the previous row and the measured exponent
``log(t2/t1) / log(n2/n1)``.  Small sizes show the fixed per-case overhead (Python), so the
exponent approaches 1 only once the arrays dominate.

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=4000000000 OMP_NUM_THREADS=1 \\
        .venv/bin/python tools/cost.py [--dtype float32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import numpy as np

from conformance import memo, planning, runner
from conformance.adapters.numpy32 import NumPy32Adapter
from conformance.cases import Case


def _best(fn, repeat: int) -> float:
    """The fastest of ``repeat`` runs (the oracle's memo cleared before each)."""
    times = []
    for _ in range(repeat):
        memo.clear()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def layer_norm_case(rows: int, features: int, dtype: str) -> planning.PlannedCase:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, features))
    inputs = {"x": x, "weight": 1.0 + 0.5 * rng.standard_normal(features),
              "bias": rng.standard_normal(features)}
    case = Case("layer_norm", f"cost_{rows}x{features}", inputs, {}, None, 0)
    return planning.PlannedCase("layer_norm", dtype, case.name, 0, case)


def adam_case(steps: int, dtype: str) -> planning.PlannedCase:
    """Adam's first fixed-gradient case with its trajectory length set to ``steps``."""
    base = dict(planning.cases_for("adam", planning.PROFILES["default"], 0))["fixed"]
    tags = tuple(t for t in base.tags if not t.startswith("steps:")) + (f"steps:{steps}",)
    case = replace(base, name=f"cost_T{steps}", tags=tags)
    return planning.PlannedCase("adam", dtype, case.name, 0, case)


def rows_of(label: str, sizes: list[int], times: list[float]) -> list[str]:
    out = [f"{label:>10} {'seconds':>9} {'ratio':>7} {'exponent':>9}"]
    for i, (n, t) in enumerate(zip(sizes, times, strict=True)):
        if i == 0:
            out.append(f"{n:>10} {t:>9.3f} {'':>7} {'':>9}")
            continue
        ratio = t / times[i - 1]
        exponent = math.log(ratio) / math.log(n / sizes[i - 1])
        out.append(f"{n:>10} {t:>9.3f} {ratio:>7.2f} {exponent:>9.2f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    adapter = NumPy32Adapter()

    sizes = [2**k for k in range(8, 19, 2)]   # elements: 256 ... 262144, 64 features a row
    runner.run_case(adapter, layer_norm_case(4, 64, args.dtype), profile="quick")   # imports, caches
    times = [_best(lambda n=n: runner.run_case(adapter, layer_norm_case(n // 64, 64, args.dtype),
                                               profile="quick"), args.repeat) for n in sizes]
    print(f"layer_norm, one case (forward and VJP, one step: no state), {args.dtype}:")
    print("\n".join(rows_of("elements", sizes, times)))

    steps = [5, 10, 20, 40, 80]
    times = [_best(lambda t=t: runner.run_case(adapter, adam_case(t, args.dtype), profile="default"),
                   args.repeat) for t in steps]
    print(f"\nadam, one trajectory of T steps, {args.dtype}:")
    print("\n".join(rows_of("T", steps, times)))


if __name__ == "__main__":
    main()
