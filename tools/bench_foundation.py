"""Benchmarks for the foundation: gradcheck cost, oracle speed and memory against PyTorch.

    .venv/bin/python tools/bench_foundation.py [--threads 2] [--repeat 3] [--quick]

Prints, all measured in this one run:
1. the cost of ``conformance.check_vjp`` on a BatchNorm input, in evaluations of the function,
   against ``torch.autograd.gradcheck`` (slow and fast mode) on the same input;
2. forward + VJP wall time of the float64 oracle on BN (32,256,14,14) and LN (32,512,768) as a
   ratio to torch CPU float32 forward + backward on the same shapes (target <= 6x);
3. the oracle's peak memory during forward + VJP (tracemalloc) as a multiple of the input's
   float64 size (target <= 6x).

Large NumPy temporaries are dominated by page faults, so the script re-executes itself with
MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set and fixes thread counts before importing NumPy.
"""

from __future__ import annotations

import argparse
import os
import sys

ENV = {
    "MALLOC_MMAP_THRESHOLD_": "1000000000",
    "MALLOC_TRIM_THRESHOLD_": "4000000000",
}


def _reexec(threads: int) -> None:
    threads_env = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    want = {**ENV, **{k: str(threads) for k in threads_env}}
    if any(os.environ.get(k) != v for k, v in want.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **want})


def _best(fn, repeat: int) -> float:
    import time

    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def gradcheck_cost() -> None:
    import numpy as np
    import torch

    import reference
    from conformance import check_vjp

    op = reference.get("batch_norm")
    rng = np.random.default_rng(0)
    shape = (4, 3, 5, 5)
    inputs = {"x": rng.standard_normal(shape), "weight": rng.standard_normal(3),
              "bias": rng.standard_normal(3)}
    calls = {"oracle": 0, "torch": 0}

    def f(inp):
        calls["oracle"] += 1
        return op.apply(inp, None, track_running_stats=False)[0]["y"]

    def vjp(inp, u):
        return op.vjp(inp, None, {"y": u}, track_running_stats=False)

    result = check_vjp(f, vjp, inputs, rtol=1e-8)
    n_in = sum(v.size for v in inputs.values())
    print(f"\n== gradcheck cost on BN {shape} + weight + bias ({n_in} input elements, float64)")
    print(f"normref check_vjp (3 directions, Richardson FD): {calls['oracle']} calls of f, "
          f"max relative error {result.max_relative_error:.2e}")

    def tf(x, w, b):
        calls["torch"] += 1
        return torch.nn.functional.batch_norm(x, None, None, w, b, training=True)

    targs = [torch.tensor(v, requires_grad=True) for v in inputs.values()]
    for fast in (False, True):
        calls["torch"] = 0
        ok = torch.autograd.gradcheck(tf, targs, fast_mode=fast)
        mode = "fast_mode" if fast else "slow mode"
        print(f"torch.autograd.gradcheck ({mode}): {calls['torch']} calls of f (passed={ok})")


def speed_and_memory(repeat: int, quick: bool) -> None:
    import torch

    import reference

    cases = [
        ("batch_norm", (32, 256, 14, 14), 1, lambda x, w, b: torch.nn.functional.batch_norm(
            x, None, None, w, b, training=True)),
        ("layer_norm", (32, 512, 768), -1, lambda x, w, b: torch.nn.functional.layer_norm(
            x, (x.shape[-1],), w, b)),
    ]
    if quick:
        cases = [(n, tuple(max(2, s // 4) for s in shp), a, fn) for n, shp, a, fn in cases]
    print(f"\n== forward + VJP, oracle float64 vs torch CPU float32 ({torch.get_num_threads()} threads, "
          f"best of {repeat})")
    print(f"{'op':<12} {'shape':<18} {'oracle s':>9} {'torch s':>9} {'ratio':>7} {'peak mem / input':>17}")
    for name, shape, axis, torch_fn in cases:
        if name not in reference.ops():
            print(f"{name:<12} (not registered yet)")
            continue
        t_oracle, t_torch, mem = _time_case(reference.get(name), shape, axis, torch_fn, repeat)
        print(f"{name:<12} {str(shape):<18} {t_oracle:9.3f} {t_torch:9.3f} {t_oracle / t_torch:6.2f}x "
              f"{mem:16.2f}x")


def _time_case(op, shape, axis, torch_fn, repeat):
    """(oracle seconds, torch seconds, oracle peak memory / input bytes) for forward + VJP."""
    import tracemalloc

    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    w, b = rng.standard_normal(shape[axis]), rng.standard_normal(shape[axis])
    dy = rng.standard_normal(shape)
    hp = {"track_running_stats": False} if op.name == "batch_norm" else {}
    inputs = {"x": x, "weight": w, "bias": b}

    def oracle():
        op.apply(inputs, None, **hp)
        op.vjp(inputs, None, {"y": dy}, **hp)

    leaves = [torch.tensor(v, dtype=torch.float32, requires_grad=True) for v in (x, w, b)]
    tdy = torch.tensor(dy, dtype=torch.float32)

    def reference_torch():
        torch.autograd.grad(torch_fn(*leaves), leaves, tdy)

    oracle()
    reference_torch()  # warm-up both
    t_oracle, t_torch = _best(oracle, repeat), _best(reference_torch, repeat)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    oracle()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return t_oracle, t_torch, peak / x.nbytes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="shapes / 4 (a smoke run)")
    args = parser.parse_args()
    _reexec(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    gradcheck_cost()
    speed_and_memory(args.repeat, args.quick)


if __name__ == "__main__":
    main()
