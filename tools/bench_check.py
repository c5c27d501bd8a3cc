"""Benchmark of the harness: the wall time of `normref check ADAPTER` over the core normalizers.

    .venv/bin/python tools/bench_check.py [ADAPTER=torch] [--profile default] [--threads 2]
        [--dtypes float64,float32,float16]

Prints the wall time, cases per second, and the share of time spent in the oracle (float64
evaluation, sensitivity probes for the bounds, the same-precision baseline) against the adapter
(the framework itself), per op and in total, all measured in this one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", nargs="?", default="torch")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float64,float32,float16")
    parser.add_argument("--ops", default=None)
    args = parser.parse_args()
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "OPENBLAS_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "1000000000",
           "MALLOC_TRIM_THRESHOLD_": "4000000000"}
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})

    from conformance import report, runner
    from conformance.adapters import load_adapter

    adapter = load_adapter(args.adapter)
    if args.adapter == "torch":
        import torch

        torch.set_num_threads(args.threads)
    dtypes = args.dtypes.split(",")
    t0 = time.perf_counter()
    planned = runner.plan(adapter, ops=args.ops, dtypes=dtypes, profile=args.profile)
    results = runner.run(adapter, planned, profile=args.profile)
    wall = time.perf_counter() - t0
    per_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for r in results:
        per_op[r.op][0] += r.seconds_oracle
        per_op[r.op][1] += r.seconds_adapter
        per_op[r.op][2] += 1
    print(f"normref check {adapter.name} --profile {args.profile} --dtypes {args.dtypes} "
          f"({args.threads} threads)")
    print(f"{'op':<24} {'cases':>6} {'oracle s':>9} {'adapter s':>10} {'oracle share':>13}")
    for op, (t_o, t_a, n) in sorted(per_op.items()):
        print(f"{op:<24} {n:>6} {t_o:9.2f} {t_a:10.2f} {t_o / max(t_o + t_a, 1e-12):12.0%}")
    t_o = sum(v[0] for v in per_op.values())
    t_a = sum(v[1] for v in per_op.values())
    print(f"{'total':<24} {len(results):>6} {t_o:9.2f} {t_a:10.2f} {t_o / max(t_o + t_a, 1e-12):12.0%}")
    print(f"wall time {wall:.1f} s, {len(results) / wall:.1f} cases/s; "
          f"verdicts {report.summary_counts(results)}")


if __name__ == "__main__":
    main()
