"""Joining the JSON reports of several runs into one (``normref merge``).

A CI matrix outgrows one machine by running ``normref check ... --shard K/N --json part-K.json``
on N machines (or one run per framework) and joining the parts.  Parts are joined only when they
describe one run: the same normref version, seed, profile, dtypes and ``--ops``; for each
adapter, either one unsharded report or every shard 1..N of the same N; no case twice.  The
joined results give the same reports and exit status as one run over everything would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conformance.planning import Coverage
from conformance.report import read_json
from conformance.runner import CaseResult

__all__ = ["SAME", "merge"]

#: Metadata every part must share.
SAME = ("normref_version", "seed", "profile", "dtypes", "ops")


def merge(paths: list[str | Path]) -> tuple[dict[str, Any], list[CaseResult], dict[str, Coverage]]:
    """The joined metadata, results (in the parts' order) and coverage per adapter; ValueError
    naming the part and the field when the parts are not shards of one run."""
    if not paths:
        raise ValueError("no report to merge")
    parts = [(str(p), *read_json(p)) for p in paths]
    first_path, first, _ = parts[0]
    for path, meta, _ in parts[1:]:
        for key in SAME:
            if meta.get(key) != first.get(key):
                raise ValueError(f"{path} is not a part of the same run as {first_path}: {key} is "
                                 f"{meta.get(key)!r}, not {first.get(key)!r}")
    _check_shards(parts)
    results: list[CaseResult] = []
    seen: dict[str, str] = {}
    adapters: dict[str, Any] = {}
    coverage: dict[str, Coverage] = {}
    for path, meta, part in parts:
        for r in part:
            if r.id in seen:
                raise ValueError(f"case {r.id} is in both {seen[r.id]} and {path} (overlapping shards?)")
            seen[r.id] = path
        results += part
        adapters.update(meta.get("adapters") or {})
        for name, cov in (meta.get("coverage") or {}).items():
            coverage.setdefault(name, Coverage(**cov))
    joined = {key: first.get(key) for key in SAME}
    joined.update({"adapters": adapters, "coverage": {n: c.__dict__ for n, c in coverage.items()},
                   "shard": None, "merged_from": [p for p, _, _ in parts]})
    return joined, results, coverage


def _check_shards(parts: list[tuple[str, dict[str, Any], list[CaseResult]]]) -> None:
    """Per set of adapters: one unsharded part, or the shards 1..N of one N, each once."""
    groups: dict[tuple[str, ...], list[tuple[str, str | None]]] = {}
    for path, meta, _ in parts:
        groups.setdefault(tuple(sorted(meta.get("adapters") or {})), []).append((path, meta.get("shard")))
    for adapters, members in groups.items():
        who = ", ".join(adapters) or "no adapter"
        shards = [s for _, s in members if s]
        if len(members) == 1 and not shards:
            continue
        if len(shards) != len(members):
            unsharded = [p for p, s in members if not s]
            raise ValueError(f"{who}: {unsharded[0]} is a whole run, and other parts are too: "
                             "merge shards of one run (--shard K/N) or whole runs of different adapters")
        sizes = {int(s.split("/")[1]) for s in shards}
        if len(sizes) != 1:
            raise ValueError(f"{who}: shards of different N ({', '.join(sorted(set(shards)))})")
        n = sizes.pop()
        given = sorted(int(s.split("/")[0]) for s in shards)
        if len(set(given)) != len(given):
            raise ValueError(f"{who}: a shard is given twice ({', '.join(shards)})")
        missing = [f"{k}/{n}" for k in range(1, n + 1) if k not in given]
        if missing:
            raise ValueError(f"{who}: missing shard {', '.join(missing)} (given {', '.join(sorted(shards))})")
