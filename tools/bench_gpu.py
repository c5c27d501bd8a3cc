"""GPU benchmark of the oracle: forward + VJP on CuPy float64 against torch CUDA float32.

    .venv/bin/python tools/bench_gpu.py [--repeat 5] [--warmup 2] [--peak-gbps GBPS]
                                        [--ops batch_norm,layer_norm] [--harness]
    .venv/bin/python tools/bench_gpu.py --dry-run    # the same code on the CPU, NumPy and torch, small shapes

Cases: BatchNorm on (256, 256, 56, 56) (training statistics over N, H, W) and LayerNorm on
(64, 2048, 4096) (over the last axis), weight and bias included.  For each case, in one run on
one device: the oracle's forward + VJP (``op.apply`` then ``op.vjp``, the public API, on float64
CuPy arrays resident on the GPU) and torch's forward + backward (``F.batch_norm`` /
``F.layer_norm`` and ``torch.autograd.grad`` on float32 CUDA tensors holding the same values
rounded), each timed as the median of ``--repeat`` runs after ``--warmup`` runs, the device
synchronized before the clock is read.  Printed: both times, the ratio oracle / torch, and the
achieved bandwidth of each as a fraction of the device's peak.

Traffic model (the compulsory bytes, the same for both sides in their own element size): a
forward pass reads x and writes y, a backward pass reads x and dy and writes dx, so forward +
VJP moves at least ``5 N`` elements (weight, bias and their gradients are negligible): ``40 N``
bytes in float64, ``20 N`` in float32.  Achieved bandwidth = those bytes / time; an
implementation that makes more passes (the oracle's two-step mean, its temporaries) shows as a
lower fraction.  Peak: ``--peak-gbps``, else 2 x memory clock x bus width from the device's
properties (HBM is double data rate; e.g. 3352 GB/s for an H100 SXM), and for reference the
bandwidth of a device-to-device copy measured in the same run.

Memory: the oracle's forward + VJP holds about 6x (BatchNorm) and 4x (LayerNorm) its input's
float64 size in temporaries besides x and dy (measured with tracemalloc on NumPy): about 13 GB
and 26 GB of GPU memory for these shapes; torch runs after the oracle's arrays are freed.

``--harness`` also times the harness's path (``conformance.judge.oracle`` with
``NORMREF_BACKEND=cupy``): NumPy arrays copied to the GPU, forward + VJP, results copied back.

Without a GPU (CuPy cannot find a CUDA device, or torch has no CUDA) it refuses with one line
and exit status 2; ``--dry-run`` runs the same code with NumPy and torch CPU on small shapes
(labelled CPU, torch on one thread like NumPy; the figures say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: op -> (shape, normalized axis)
GPU_CASES = {"batch_norm": ((256, 256, 56, 56), 1), "layer_norm": ((64, 2048, 4096), -1)}
CPU_CASES = {"batch_norm": ((8, 32, 28, 28), 1), "layer_norm": ((8, 256, 512), -1)}
#: Elements moved by forward + VJP, per element of x (see the module docstring).
PASSES = 5


@dataclass
class Platform:
    """Where one run computes: the oracle's array module and torch's device, and how to wait."""

    label: str                          # "GPU" or "CPU"
    xp: Any                             # numpy or cupy (the raw module: random numbers, dtypes)
    torch_device: str                   # "cuda" or "cpu"
    sync: Callable[[], None]            # block until both sides' queued work is done
    free: Callable[[], None]            # return both sides' cached memory
    name: str                           # the device, in words
    peak_gbps: float | None             # the theoretical peak, when known
    peak_source: str


def _gpu_platform(peak_gbps: float | None) -> Platform:
    from conformance import oracle_device

    oracle_device.cupy_backend("bench_gpu")  # one-line refusal without CuPy or a CUDA device
    import cupy
    import torch

    if not torch.cuda.is_available():
        raise oracle_device.OracleDeviceError("bench_gpu: torch has no CUDA device (torch.cuda.is_available()"
                                              " is False: a CPU build of torch, or no GPU)")
    device = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(device.id)
    name = props["name"].decode() if isinstance(props.get("name"), bytes) else str(props.get("name"))
    source = "--peak-gbps"
    if peak_gbps is None:
        peak_gbps, source = _peak_from_properties(cupy, device.id, props)

    def sync() -> None:
        cupy.cuda.Device().synchronize()
        torch.cuda.synchronize()

    def free() -> None:
        cupy.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()

    return Platform("GPU", cupy, "cuda", sync, free, f"{name} (device {device.id})", peak_gbps, source)


def _peak_from_properties(cupy: Any, device_id: int, props: dict[str, Any]) -> tuple[float | None, str]:
    """2 x memory clock (kHz) x bus width (bits) / 8, in GB/s, from the properties or the device
    attributes (CUDA 13 dropped the clock from cudaDeviceProp)."""
    clock_khz, bus_bits = props.get("memoryClockRate"), props.get("memoryBusWidth")
    runtime = cupy.cuda.runtime
    try:
        clock_khz = clock_khz or runtime.deviceGetAttribute(runtime.cudaDevAttrMemoryClockRate, device_id)
        bus_bits = bus_bits or runtime.deviceGetAttribute(runtime.cudaDevAttrGlobalMemoryBusWidth, device_id)
    except Exception:  # noqa: BLE001 - an attribute this CUDA does not report
        pass
    if not clock_khz or not bus_bits:
        return None, "unknown (pass --peak-gbps)"
    gbps = 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    return gbps, f"2 x {clock_khz / 1e6:.3f} GHz x {bus_bits} bit"


def _cpu_platform(peak_gbps: float | None) -> Platform:
    import platform

    import numpy as np
    import torch

    torch.set_num_threads(1)  # NumPy's elementwise work is single-threaded: compare like with like

    return Platform("CPU", np, "cpu", lambda: None, lambda: None, platform.processor() or platform.machine(),
                    peak_gbps, "--peak-gbps" if peak_gbps else "unknown (pass --peak-gbps)")


def _median_seconds(fn: Callable[[], Any], sync: Callable[[], None], warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(plat: Platform, warmup: int, repeat: int) -> float:
    """GB/s of a device copy of 2 GiB (GPU) / 256 MiB (CPU) of float64: read + write."""
    xp = plat.xp
    n = (1 << 28) if plat.label == "GPU" else (1 << 25)
    pair = [xp.ones(n, dtype=xp.float64), xp.empty(n, dtype=xp.float64)]
    seconds = _median_seconds(lambda: xp.copyto(pair[1], pair[0]), plat.sync, warmup, repeat)
    pair.clear()
    plat.free()
    return 2 * n * 8 / seconds / 1e9


@dataclass
class Timing:
    op: str
    shape: tuple[int, ...]
    oracle_s: float
    torch_s: float
    harness_s: float | None

    @property
    def elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def time_case(plat: Platform, op_name: str, shape: tuple[int, ...], axis: int, warmup: int, repeat: int,
              *, harness: bool) -> Timing:
    """The oracle (float64, the platform's array module) and torch (float32, its device) on the
    same values, forward + VJP, median seconds each."""
    import numpy as np
    import torch

    import reference

    xp, device = plat.xp, plat.torch_device
    op = reference.get(op_name)
    rng = xp.random.default_rng(0)
    data = {"x": rng.standard_normal(shape, dtype=xp.float64),
            "dy": rng.standard_normal(shape, dtype=xp.float64),
            "weight": rng.standard_normal(shape[axis], dtype=xp.float64),
            "bias": rng.standard_normal(shape[axis], dtype=xp.float64)}
    if op_name == "batch_norm":
        hp: dict[str, Any] = {"axis": axis, "track_running_stats": False}
    else:
        hp = {"axes": (axis,)}
    inputs = {k: data[k] for k in ("x", "weight", "bias")}
    cotangents = {"y": data["dy"]}

    def oracle() -> None:
        op.apply(inputs, None, **hp)
        op.vjp(inputs, None, cotangents, **hp)

    oracle_s = _median_seconds(oracle, plat.sync, warmup, repeat)
    harness_s = _time_harness(plat, op, hp, data, warmup, repeat) if harness else None

    # torch float32 on the same values rounded (zero-copy from the oracle's arrays, then cast).
    def tensor(a: Any) -> Any:
        t = torch.from_dlpack(a) if device == "cuda" else torch.from_numpy(np.asarray(a))
        return t.to(torch.float32)

    leaves = [tensor(data[k]).requires_grad_(True) for k in ("x", "weight", "bias")]
    leaves.append(tensor(data["dy"]))
    for held in (data, inputs, cotangents):
        held.clear()  # the float64 arrays go before torch allocates
    plat.free()
    if op_name == "batch_norm":
        def forward(t: Any, tw: Any, tb: Any) -> Any:
            return torch.nn.functional.batch_norm(t, None, None, tw, tb, training=True)
    else:
        def forward(t: Any, tw: Any, tb: Any) -> Any:
            return torch.nn.functional.layer_norm(t, (t.shape[-1],), tw, tb)

    def torch_step() -> None:
        torch.autograd.grad(forward(*leaves[:3]), leaves[:3], leaves[3])

    torch_s = _median_seconds(torch_step, plat.sync, warmup, repeat)
    leaves.clear()
    plat.free()
    return Timing(op_name, tuple(shape), oracle_s, torch_s, harness_s)


def _time_harness(plat: Platform, op: Any, hp: dict[str, Any], data: dict[str, Any], warmup: int,
                  repeat: int) -> float:
    """The harness's oracle path: host float64 arrays to the backend and back (judge.oracle)."""
    import numpy as np

    from conformance import judge, oracle_device

    def host(a: Any) -> np.ndarray:
        return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)

    arrays = judge.pack({k: host(data[k]) for k in ("x", "weight", "bias")}, None, {"y": host(data["dy"])})
    backend = oracle_device.cupy_backend("bench_gpu") if plat.label == "GPU" else oracle_device.select("cpu")
    evaluate = judge.oracle(op, op.spec.resolve(hp), backend=backend)
    seconds = _median_seconds(lambda: evaluate(arrays), plat.sync, min(warmup, 1), repeat)
    arrays.clear()
    plat.free()
    return seconds


def report(plat: Platform, timings: list[Timing], copy_gbps: float) -> None:
    print(f"\n{plat.label}: {plat.name}; peak {_gbps(plat.peak_gbps)} ({plat.peak_source}); "
          f"measured copy {copy_gbps:.0f} GB/s")
    print("traffic: forward + VJP reads x, x, dy and writes y, dx: 5 N elements (40 N bytes in float64, "
          "20 N in float32)")
    header = (f"{'op':<11} {'shape':<20} {'oracle f64 s':>12} {'torch f32 s':>11} {'oracle/torch':>12} "
              f"{'oracle GB/s':>11} {'% peak':>6} {'% copy':>6} "
              f"{'torch GB/s':>10} {'% peak':>6} {'% copy':>6}")
    print(header)
    for t in timings:
        oracle_gbps = PASSES * t.elements * 8 / t.oracle_s / 1e9
        torch_gbps = PASSES * t.elements * 4 / t.torch_s / 1e9
        print(f"{t.op:<11} {str(t.shape):<20} {t.oracle_s:12.4f} {t.torch_s:11.4f} "
              f"{t.oracle_s / t.torch_s:11.2f}x "
              f"{oracle_gbps:11.1f} {_pct(oracle_gbps, plat.peak_gbps):>6} {_pct(oracle_gbps, copy_gbps):>6} "
              f"{torch_gbps:10.1f} {_pct(torch_gbps, plat.peak_gbps):>6} {_pct(torch_gbps, copy_gbps):>6}")
        if t.harness_s is not None:
            print(f"{'':<11} harness path (host copies + forward + VJP): {t.harness_s:.4f} s "
                  f"({t.harness_s / t.oracle_s:.2f}x the resident oracle)")


def _gbps(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} GB/s"


def _pct(value: float, peak: float | None) -> str:
    return "n/a" if not peak else f"{100.0 * value / peak:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed runs first (kernel compilation, memory pools)")
    parser.add_argument("--peak-gbps", type=float, default=None, dest="peak_gbps",
                        help="the memory's peak bandwidth in GB/s (default: from the device's properties)")
    parser.add_argument("--ops", default=",".join(GPU_CASES), help="comma-separated: batch_norm, layer_norm")
    parser.add_argument("--harness", action="store_true",
                        help="also time the harness's path (host arrays copied to the device and back)")
    parser.add_argument("--dry-run", action="store_true", dest="dry_run",
                        help="run on the CPU (NumPy oracle, torch CPU) with small shapes")
    args = parser.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in GPU_CASES]
    if unknown or args.repeat < 1 or args.warmup < 0:
        parser.error(f"--ops must name some of {', '.join(GPU_CASES)} (got {unknown}); --repeat >= 1, "
                     "--warmup >= 0")
    if args.dry_run:
        # NumPy's large temporaries: the allocator settings of tools/bench_foundation.py (one thread)
        from bench_foundation import _reexec

        _reexec(1)
        plat, cases = _cpu_platform(args.peak_gbps), CPU_CASES
    else:
        try:
            plat, cases = _gpu_platform(args.peak_gbps), GPU_CASES
        except (ImportError, ValueError) as exc:
            print(f"{exc} (--dry-run runs the same code on the CPU)", file=sys.stderr)
            return 2
    copy_gbps = copy_bandwidth(plat, args.warmup, args.repeat)
    timings = []
    for name in ops:
        shape, axis = cases[name]
        timings.append(time_case(plat, name, shape, axis, args.warmup, args.repeat,
                                 harness=args.harness or args.dry_run))
    report(plat, timings, copy_gbps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
