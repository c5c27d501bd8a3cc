"""Reports of a run: terminal summary, JSON, JUnit XML, Markdown.

All four are written from the same list of :class:`conformance.runner.CaseResult`; every verdict
carries its measured error, the bound it was judged against, their ratio, and a repro line.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO
from xml.etree import ElementTree as ET

from conformance.runner import CaseResult

__all__ = [
    "SHORT",
    "exit_code",
    "grid",
    "progress_printer",
    "summary_counts",
    "terminal",
    "to_json",
    "to_junit_xml",
    "to_markdown",
]

SHORT = {"PASS": "P", "CONVENTION": "C", "MISTRUSTED": "M", "FAIL": "F", "ERROR": "E",
         "SKIP": "S", "XFAIL": "xf", "XPASS": "XP"}
ORDER = ["ERROR", "FAIL", "XPASS", "CONVENTION", "MISTRUSTED", "XFAIL", "PASS", "SKIP"]
NOTEWORTHY = ("ERROR", "FAIL", "XPASS", "CONVENTION")


def exit_code(results: list[CaseResult], *, strict_xpass: bool = True) -> int:
    """0 when nothing FAILs, ERRORs (or XPASSes, when strict); 1 otherwise."""
    bad = {"FAIL", "ERROR"} | ({"XPASS"} if strict_xpass else set())
    return 1 if any(r.verdict in bad for r in results) else 0


def summary_counts(results: list[CaseResult]) -> dict[str, int]:
    counts = Counter(r.verdict for r in results)
    return {v: counts[v] for v in ORDER if counts[v]}


def _fmt_ratio(x: float) -> str:
    return "-" if not math.isfinite(x) or x == 0 else f"{x:.2g}"


def grid(results: list[CaseResult]) -> tuple[list[str], list[str], dict[tuple[str, str], str]]:
    """(ops, dtypes, cell text): verdict counts per op × dtype and the worst error/bound ratio."""
    cells: dict[tuple[str, str], list[CaseResult]] = defaultdict(list)
    for r in results:
        cells[(r.op, r.dtype)].append(r)
    ops = sorted({r.op for r in results})
    dtypes = [d for d in ("float64", "float32", "float16", "bfloat16") if any(r.dtype == d for r in results)]
    text = {}
    for key, rs in cells.items():
        counts = Counter(r.verdict for r in rs)
        parts = [f"{SHORT[v]}{counts[v]}" for v in ORDER if counts[v]]
        judged = [r.worst_ratio for r in rs if r.verdict in ("PASS", "FAIL", "CONVENTION", "XFAIL", "XPASS")
                  and math.isfinite(r.worst_ratio)]
        worst = max(judged, default=0.0)
        text[key] = " ".join(parts) + (f" r={_fmt_ratio(worst)}" if worst else "")
    return ops, dtypes, text


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _detail(r: CaseResult) -> list[str]:
    lines = [f"{r.verdict}  {r.id}"]
    if r.verdict in ("FAIL", "CONVENTION", "XPASS") and r.worst:
        lines.append(f"    worst: {r.worst} at step {r.step}: max |err| {r.max_abs_error:.3g} "
                     f"(rel {r.max_rel_error:.3g}), bound {r.bound:.3g}, ratio {r.worst_ratio:.3g}")
    if r.diagnosis:
        lines.append(f"    diagnosis: {r.diagnosis} (instead of the declared {r.dialect})")
    if r.message and not (r.worst and r.message.startswith(f"step {r.step}: {r.worst}")):
        lines.append(f"    {r.message}")
    for c in r.comparisons[:4]:
        lines.append(f"    {c}")
    lines.append(f"    repro: {r.repro}")
    return lines


def terminal(results: list[CaseResult], out: TextIO | None = None, *, title: str = "") -> None:
    """The op × dtype grid, the totals, then each noteworthy case with its repro line."""
    out = out if out is not None else sys.stdout
    ops, dtypes, text = grid(results)
    if title:
        print(title, file=out)
    rows = [[op, *[text.get((op, d), "") for d in dtypes]] for op in ops]
    print(_table(rows, ["op", *dtypes]), file=out)
    legend = ", ".join(f"{s}={v}" for v, s in SHORT.items())
    print(f"\n({legend}; r = worst measured error / bound)", file=out)
    counts = summary_counts(results)
    print("totals: " + ", ".join(f"{v} {n}" for v, n in counts.items()), file=out)
    noteworthy = sorted((r for r in results if r.verdict in NOTEWORTHY), key=lambda r: ORDER.index(r.verdict))
    if noteworthy:
        print("", file=out)
    for r in noteworthy:
        print("\n".join(_detail(r)), file=out)


def progress_printer(stream: TextIO | None = None):
    """A one-line progress bar for a TTY (None when ``stream`` is not a terminal)."""
    stream = stream if stream is not None else sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        return None

    def show(done: int, total: int, result: CaseResult) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "-" * (width - filled)
        line = f"\r[{bar}] {done}/{total} {result.op} {result.dtype} {result.verdict}"
        stream.write(line[:120].ljust(100))
        if done == total:
            stream.write("\n")
        stream.flush()

    return show


def _record(r: CaseResult) -> dict[str, Any]:
    rec = asdict(r)
    rec["repro"] = r.repro
    for key in ("worst_ratio", "max_abs_error", "max_rel_error", "bound"):
        if not math.isfinite(rec[key]):
            rec[key] = None if math.isnan(rec[key]) else str(rec[key])
    return rec


def to_json(results: list[CaseResult], path: str | Path, *, meta: dict[str, Any] | None = None) -> None:
    """One record per case, plus the run's metadata and totals."""
    doc = {**(meta or {}), "summary": summary_counts(results), "cases": [_record(r) for r in results]}
    Path(path).write_text(json.dumps(doc, indent=2, default=str))


def to_junit_xml(results: list[CaseResult], path: str | Path, *, suite: str = "normref") -> None:
    """JUnit XML: one testcase per case; FAIL/XPASS as failure, ERROR as error, SKIP/XFAIL as skipped."""
    root = ET.Element("testsuites")
    by_adapter: dict[str, list[CaseResult]] = defaultdict(list)
    for r in results:
        by_adapter[r.adapter].append(r)
    for adapter, rs in by_adapter.items():
        ts = ET.SubElement(root, "testsuite", name=f"{suite}.{adapter}", tests=str(len(rs)),
                           failures=str(sum(r.verdict in ("FAIL", "XPASS") for r in rs)),
                           errors=str(sum(r.verdict == "ERROR" for r in rs)),
                           skipped=str(sum(r.verdict in ("SKIP", "XFAIL") for r in rs)),
                           time=f"{sum(r.seconds_adapter + r.seconds_oracle for r in rs):.3f}")
        for r in rs:
            tc = ET.SubElement(ts, "testcase", classname=f"{suite}.{adapter}.{r.op}.{r.dtype}", name=r.case,
                               time=f"{r.seconds_adapter + r.seconds_oracle:.3f}")
            body = "\n".join(_detail(r))
            if r.verdict in ("FAIL", "XPASS"):
                ET.SubElement(tc, "failure", message=f"{r.verdict}: {r.message}"[:500]).text = body
            elif r.verdict == "ERROR":
                ET.SubElement(tc, "error", message=r.message[:500]).text = body
            elif r.verdict in ("SKIP", "XFAIL"):
                ET.SubElement(tc, "skipped", message=f"{r.verdict}: {r.message}"[:500])
            else:
                ET.SubElement(tc, "system-out").text = body
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def to_markdown(results: list[CaseResult], path: str | Path, *, title: str = "normref conformance") -> None:
    """A pull-request comment: the grid, the totals, and the noteworthy cases with repro lines."""
    ops, dtypes, text = grid(results)
    lines = [f"### {title}", "", "| op | " + " | ".join(dtypes) + " |", "|---|" + "---|" * len(dtypes)]
    lines += [f"| `{op}` | " + " | ".join(text.get((op, d), "") for d in dtypes) + " |" for op in ops]
    counts = summary_counts(results)
    lines += ["", "**Totals:** " + ", ".join(f"{v} {n}" for v, n in counts.items()), ""]
    noteworthy = [r for r in results if r.verdict in NOTEWORTHY]
    if noteworthy:
        lines += ["<details><summary>Noteworthy cases</summary>", "", "```"]
        for r in noteworthy:
            lines += _detail(r)
        lines += ["```", "</details>"]
    Path(path).write_text("\n".join(lines) + "\n")
