"""Seed sweep: run the conformance cases of one adapter over many seeds and list what is flagged.

A correct implementation must pass every seed; a bound that is too tight shows as a rare FAIL
in a sweep long before a user meets it.  Prints one line per seed (verdict counts) and every FAIL,
ERROR and CONVENTION with its id and message, then the totals.

    .venv/bin/python tools/sweep.py torch --ops normalizers --dtypes float64,float32,float16 \\
        --seeds 0-199 [--profile default] [--no-realistic] [--jobs 2]

``--no-realistic`` leaves out the spec's realistic-size cases (seeded like the others, but they
dominate the time); ``--jobs`` runs seeds in that many worker processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import sys
import time
from collections import Counter

FLAGGED = ("FAIL", "ERROR", "CONVENTION", "XPASS")


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


Job = tuple[str, "str | None", list[str], str, bool, "str | None", int]


def run_seed(args: Job) -> tuple[int, Counter, list[str], float]:
    adapter_name, ops, dtypes, profile, realistic, xfails_path, seed = args
    from conformance import planning, runner, xfails
    from conformance.adapters import load_adapter

    if not realistic:
        base = planning.PROFILES[profile]
        planning.PROFILES[profile] = dataclasses.replace(base, realistic=False)
    adapter = load_adapter(adapter_name)
    expected = xfails.load(xfails_path)
    t0 = time.perf_counter()
    planned = runner.plan(adapter, ops=ops, dtypes=dtypes, seed=seed, profile=profile)
    results = runner.run(adapter, planned, profile=profile, xfails=expected)
    flagged = [f"{r.verdict} {r.id}: ratio {r.worst_ratio:.3g} {r.diagnosis or r.message[:160]}"
               for r in results if r.verdict in FLAGGED]
    return seed, Counter(r.verdict for r in results), flagged, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("adapter")
    parser.add_argument("--ops", default=None)
    parser.add_argument("--dtypes", default="float64,float32,float16")
    parser.add_argument("--seeds", default="0-9", help="e.g. 0-199 or 0,5,7-9")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--no-realistic", action="store_true")
    parser.add_argument("--xfails", default=None)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    work = [(args.adapter, args.ops, args.dtypes.split(","), args.profile, not args.no_realistic,
             args.xfails, s) for s in _seeds(args.seeds)]
    totals: Counter = Counter()
    flagged_all: list[str] = []
    with multiprocessing.get_context("spawn").Pool(args.jobs) if args.jobs > 1 else _Serial() as pool:
        for seed, counts, flagged, seconds in pool.imap(run_seed, work):
            totals.update(counts)
            flagged_all += flagged
            print(f"seed {seed:4d}: {dict(sorted(counts.items()))} {seconds:.0f} s", flush=True)
            for line in flagged:
                print(f"    {line}", flush=True)
    print(f"totals over {len(work)} seeds: {dict(sorted(totals.items()))}")
    print(f"flagged: {len(flagged_all)}")
    return 1 if flagged_all else 0


class _Serial:
    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def imap(fn, items):  # the Pool interface
        return map(fn, items)


if __name__ == "__main__":
    sys.exit(main())
