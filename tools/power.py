"""The harness's power: the smallest relative error injected into one output that it flags.

A correct implementation (the oracle's formulas in the dtype under test: the ``numpy32``
baseline, float64 included) is made wrong by a systematic relative error ``delta`` in one
quantity, and the op's whole default-profile case list is run through the harness.  ``delta`` is
bisected on a log2 grid (resolution 2^0.5) between 2^-60 and 1; the table gives, per dtype, the
smallest ``delta`` for which at least one case is FAIL or ERROR, and how many cases flag it.

Injections (one output each, all elements scaled by ``1 + delta``):

* ``layer_norm``: the output ``y``;
* ``batch_norm``: the input gradient ``grads.x``;
* ``adam``: the update, ``w_new = w + (w_new - w)(1 + delta)`` for every parameter tensor.

A ``delta`` of 0 flagged means the harness flags the correct implementation itself (a false FAIL).

    .venv/bin/python tools/power.py [--ops layer_norm,batch_norm,adam] [--dtypes ...] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from conformance import runner
from conformance.adapters import OpSupport, Request, Response
from conformance.adapters.numpy32 import NumPy32Adapter

QUANTITY = {"layer_norm": "outputs.y", "batch_norm": "grads.x", "adam": "update"}


class Injected(NumPy32Adapter):
    """The numpy32 baseline (float64: the oracle's formulas in float64) with one output scaled."""

    name = "injected"

    def __init__(self, op: str, delta: float, dtypes: tuple[str, ...]) -> None:
        super().__init__()
        self.op, self.delta, self.dtypes = op, delta, dtypes

    def ops(self) -> dict[str, OpSupport]:
        return {self.op: OpSupport(dialect={}, dtypes=self.dtypes)}

    def evaluate(self, op: str, request: Request) -> Response:
        response = super().evaluate(op, request)
        scale = 1.0 + self.delta
        where = QUANTITY[op]
        if where == "update":
            for key, new in response.outputs.items():
                old = np.asarray(request.inputs[key], dtype=np.float64)
                moved = old + (np.asarray(new, dtype=np.float64) - old) * scale
                response.outputs[key] = moved.astype(np.asarray(new).dtype)
        else:
            part, name = where.split(".")
            tree = getattr(response, part)
            if name in tree:
                value = np.asarray(tree[name])
                tree[name] = (value.astype(np.float64) * scale).astype(value.dtype)
        return response


def flagged(op: str, dtype: str, delta: float, seed: int) -> int:
    adapter = Injected(op, delta, (dtype,))
    planned = runner.plan(adapter, ops=f"^{op}$", dtypes=[dtype], seed=seed, profile="default")
    results = runner.run(adapter, planned, profile="default")
    return sum(r.verdict in ("FAIL", "ERROR") for r in results)


def smallest(op: str, dtype: str, seed: int) -> tuple[float, int]:
    """(smallest flagged delta on the grid, cases flagging it); (0, n) if delta = 0 is flagged."""
    zero = flagged(op, dtype, 0.0, seed)
    if zero:
        return 0.0, zero
    lo, hi = -60.0, 0.0  # log2 delta: lo not flagged (assumed), hi flagged (checked)
    count = flagged(op, dtype, 2.0**hi, seed)
    if not count:
        return math.inf, 0
    while hi - lo > 0.5:
        mid = (lo + hi) / 2
        n = flagged(op, dtype, 2.0**mid, seed)
        if n:
            hi, count = mid, n
        else:
            lo = mid
    return 2.0**hi, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", default="layer_norm,batch_norm,adam")
    parser.add_argument("--dtypes", default="float64,float32,float16,bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{'op':12s} {'quantity':10s} {'dtype':9s} {'smallest delta':>15s} {'cases':>6s} {'seconds':>8s}")
    for op in args.ops.split(","):
        for dtype in args.dtypes.split(","):
            t0 = time.perf_counter()
            delta, count = smallest(op, dtype, args.seed)
            text = "none <= 1" if math.isinf(delta) else ("0 (false FAIL)" if delta == 0 else f"{delta:.3g}")
            print(f"{op:12s} {QUANTITY[op]:10s} {dtype:9s} {text:>15s} {count:>6d} "
                  f"{time.perf_counter() - t0:8.1f}", flush=True)


if __name__ == "__main__":
    main()
