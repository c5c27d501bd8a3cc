"""Benchmark of the optimizer checks.

    .venv/bin/python tools/bench_optim.py [--steps 200] [--threads 2] [--suite torch,jax]

1. A 200-step trajectory check of AdamW (decoupled decay 0.1, lr dropped mid-run) on a 10-tensor
   model (a small CNN: two conv layers with biases and batch-norm gains/biases, a linear layer
   with its bias; 22,000 parameters), float32, through the torch adapter: the time of the oracle
   side (float64 steps, single-step bounds and the propagated accumulated bound) against the
   torch.optim side (``torch.optim.AdamW``, state loaded and read back every step), and, as a
   bare reference, 200 plain oracle steps against 200 plain ``torch.optim.AdamW`` steps — every
   figure measured in this one run.
2. The wall time of the whole optimizer suite (``normref check ADAPTER --ops optim``, default
   profile, float64 and float32) for each adapter in ``--suite``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

MODEL = {"conv1/weight": (32, 3, 3, 3), "conv1/bias": (32,), "bn1/weight": (32,), "bn1/bias": (32,),
         "conv2/weight": (64, 32, 3, 3), "conv2/bias": (64,), "bn2/weight": (64,), "bn2/bias": (64,),
         "fc/weight": (10, 64), "fc/bias": (10,)}


def _trajectory_check(steps: int) -> None:
    import numpy as np

    import reference
    from conformance import runner, step_sources, trajectory
    from conformance.adapters import load_adapter
    from conformance.cases import Case, case_rng

    adapter = load_adapter("torch")
    rng = case_rng(0, "bench", "adamw")
    inputs = {f"params/{p}": step_sources._initial(rng, p, s, "fixed") for p, s in MODEL.items()}
    case = Case("adamw", "bench10", inputs, {}, None, 0,
                overrides={"lr": 1e-2, "weight_decay": 0.1},
                tags=("gradients:fixed", "schedule:drop", f"steps:{steps}"))
    planned = runner.PlannedCase("adamw", "float32", "bench10", 0, case)
    t0 = time.perf_counter()
    result = runner.run_case(adapter, planned, profile="default")
    wall = time.perf_counter() - t0
    n = sum(int(np.prod(s)) for s in MODEL.values())
    print(f"AdamW trajectory check: {steps} steps, {len(MODEL)} tensors, {n} parameters, float32 -> "
          f"{result.verdict} (worst error/bound {result.worst_ratio:.3g})")
    ratio = result.seconds_oracle / result.seconds_adapter
    print(f"  wall {wall:.2f} s: oracle side {result.seconds_oracle:.2f} s, torch.optim side "
          f"{result.seconds_adapter:.2f} s, ratio oracle/torch {ratio:.1f}x")

    import torch

    op = reference.get("adamw")
    params = {p: np.asarray(v, dtype=np.float64) for p, v in
              ((k[len("params/"):], v) for k, v in inputs.items())}
    source = trajectory.GradientSource("fixed", MODEL, 0, "adamw", "bench10")
    grads = [source(None, k) for k in range(steps)]
    state = op.init(params, weight_decay=0.1)
    t0 = time.perf_counter()
    p = params
    for g in grads:
        p, state = op.step(p, g, state, lr=1e-2, weight_decay=0.1)
    oracle_plain = time.perf_counter() - t0
    tensors = [torch.nn.Parameter(torch.tensor(v, dtype=torch.float32)) for v in params.values()]
    opt = torch.optim.AdamW(tensors, lr=1e-2, weight_decay=0.1, foreach=False)
    tgrads = [[torch.tensor(g[k], dtype=torch.float32) for k in params] for g in grads]
    t0 = time.perf_counter()
    for gs in tgrads:
        for t, g in zip(tensors, gs, strict=True):
            t.grad = g
        opt.step()
    torch_plain = time.perf_counter() - t0
    print(f"  plain steps: oracle float64 {oracle_plain:.3f} s, torch.optim.AdamW float32 "
          f"{torch_plain:.3f} s, ratio {oracle_plain / torch_plain:.1f}x")


def _suite(adapter_name: str) -> None:
    from collections import Counter

    from conformance import runner
    from conformance.adapters import load_adapter

    adapter = load_adapter(adapter_name)
    planned = runner.plan(adapter, ops="optim", dtypes=["float64", "float32"], profile="default")
    t0 = time.perf_counter()
    results = runner.run(adapter, planned, profile="default")
    wall = time.perf_counter() - t0
    counts = Counter(r.verdict for r in results)
    oracle = sum(r.seconds_oracle for r in results)
    framework = sum(r.seconds_adapter for r in results)
    print(f"optimizer suite, {adapter_name}: {len(results)} cases in {wall:.1f} s "
          f"({dict(sorted(counts.items()))}); oracle {oracle:.1f} s, {adapter_name} {framework:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--suite", default="torch,jax", help="adapters for part 2 ('' to skip)")
    args = parser.parse_args()
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "OPENBLAS_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "1000000000",
           "MALLOC_TRIM_THRESHOLD_": "4000000000"}
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})
    import torch

    torch.set_num_threads(args.threads)
    _trajectory_check(args.steps)
    for name in filter(None, args.suite.split(",")):
        _suite(name)


if __name__ == "__main__":
    main()
