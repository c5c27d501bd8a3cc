"""Reports of a run: terminal summary, JSON, JUnit XML, Markdown.

All four are written from the same list of :class:`conformance.runner.CaseResult`; every verdict
carries its measured error, the bound it was judged against, their ratio, and a repro line.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TextIO
from xml.etree import ElementTree as ET

from conformance.dtypes import DTYPES
from conformance.planning import Coverage
from conformance.runner import JUDGED, CaseResult

__all__ = [
    "EXIT_EMPTY",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "SHORT",
    "coverage_lines",
    "detail_lines",
    "exit_code",
    "grid",
    "progress_printer",
    "read_json",
    "results_from_dict",
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
#: Verdicts whose error/bound ratio the grid's worst-ratio column shows (XFAIL is expected to
#: be far off, MISTRUSTED and SKIP judge nothing).
RATIO_VERDICTS = ("PASS", "FAIL", "CONVENTION", "XPASS")

#: Exit statuses of ``normref check`` (README "Exit codes").
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_EMPTY = 0, 1, 2, 3


def exit_code(results: list[CaseResult], *, strict_xpass: bool = True, allow_conventions: bool = False,
              allow_empty: bool = False) -> int:
    """1 when a case FAILs, ERRORs, XPASSes (unless not ``strict_xpass``) or is CONVENTION (unless
    ``allow_conventions``: the declared dialect is the adapter's claim); else 3 when nothing was
    judged (unless ``allow_empty``); else 0."""
    bad = {"FAIL", "ERROR"} | ({"XPASS"} if strict_xpass else set()) | (
        set() if allow_conventions else {"CONVENTION"})
    if any(r.verdict in bad for r in results):
        return EXIT_FAILED
    if not allow_empty and not any(r.verdict in JUDGED for r in results):
        return EXIT_EMPTY
    return EXIT_OK


def summary_counts(results: list[CaseResult]) -> dict[str, int]:
    counts = Counter(r.verdict for r in results)
    return {v: counts[v] for v in ORDER if counts[v]}


def _fmt_ratio(x: float) -> str:
    return "-" if not math.isfinite(x) or x == 0 else f"{x:.2g}"


def grid(results: list[CaseResult], coverage: Coverage | None = None
         ) -> tuple[list[str], list[str], dict[tuple[str, str], str]]:
    """(ops, dtypes, cell text): verdict counts per op × dtype and the worst error/bound ratio.

    With a ``coverage``, the rows are the selected ops the adapter implements (in the registry's
    order), the columns the dtypes asked for; a dtype the adapter does not declare for an op reads
    ``n/a``, and a forward-only op's cells end in ``(fwd)``.
    """
    cells: dict[tuple[str, str], list[CaseResult]] = defaultdict(list)
    for r in results:
        cells[(r.op, r.dtype)].append(r)
    if coverage is not None:
        ops = coverage.implemented
        dtypes = list(coverage.dtypes)
    else:
        ops = sorted({r.op for r in results})
        dtypes = [d for d in DTYPES if any(r.dtype == d for r in results)]
    text = {}
    for op in ops:
        for dtype in dtypes:
            rs = cells.get((op, dtype), [])
            if coverage is not None and dtype in coverage.unsupported.get(op, ()):
                text[(op, dtype)] = "n/a"
                continue
            counts = Counter(r.verdict for r in rs)
            parts = [f"{SHORT[v]}{counts[v]}" for v in ORDER if counts[v]]
            judged = [r.worst_ratio for r in rs
                      if r.verdict in RATIO_VERDICTS and math.isfinite(r.worst_ratio)]
            worst = max(judged, default=0.0)
            cell = " ".join(parts) + (f" r={_fmt_ratio(worst)}" if worst else "")
            if rs and not any(r.gradients_checked for r in rs) and reference_differentiable(op):
                cell += " (fwd)"
            text[(op, dtype)] = cell
    return ops, dtypes, text


def reference_differentiable(op: str) -> bool:
    import reference

    spec = reference.get(op).spec
    return spec.differentiable and not spec.is_optimizer


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _detail(r: CaseResult) -> list[str]:
    lines = [f"{r.verdict}  {r.id}" + (f"  [{r.error_kind}]" if r.error_kind else "")]
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


def detail_lines(r: CaseResult) -> list[str]:
    """The lines the terminal report prints for a noteworthy case: verdict and id, the worst
    quantity with its error, bound and ratio, the diagnosis, the failing comparisons and the
    ``normref repro`` line (the Markdown and JUnit reports hold the same lines)."""
    return _detail(r)


def _skip_reasons(results: list[CaseResult]) -> list[str]:
    """SKIPs grouped by reason: how many, for which ops."""
    groups: dict[str, list[CaseResult]] = defaultdict(list)
    for r in results:
        if r.verdict == "SKIP":
            groups[r.message].append(r)
    lines = []
    for message, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        ops = sorted({r.op for r in rs})
        lines.append(f"  {len(rs):4d}  {', '.join(ops)}: {message}")
    return lines


def coverage_lines(adapter: str, coverage: Coverage) -> list[str]:
    """What the grid does not show: ops not implemented, forward-only ops, state not compared."""
    lines = []
    if coverage.not_implemented:
        names = coverage.not_implemented
        shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
        lines.append(f"{len(names)} selected registered op{'s' * (len(names) > 1)} not implemented by "
                     f"{adapter}: {shown}")
    if coverage.forward_only:
        lines.append(f"gradients not checked (forward-only in {adapter}): {', '.join(coverage.forward_only)}")
    for op, slots in coverage.not_kept.items():
        lines.append(f"not compared (not kept by {adapter}): {op} state {', '.join(slots)}")
    return lines


def terminal(results: list[CaseResult], out: TextIO | None = None, *, title: str = "",
             coverage: dict[str, Coverage] | None = None) -> None:
    """The op × dtype grid (one per adapter), coverage notes, totals, SKIP reasons, XFAILs, then
    each noteworthy case with its repro line."""
    out = out if out is not None else sys.stdout
    if title:
        print(title, file=out)
    by_adapter: dict[str, list[CaseResult]] = defaultdict(list)
    for r in results:
        by_adapter[r.adapter].append(r)
    names = list(coverage) if coverage else list(by_adapter)
    for name in names:
        cov = (coverage or {}).get(name)
        ops, dtypes, text = grid(by_adapter.get(name, []), cov)
        if len(names) > 1:
            print(f"\n[{name}]", file=out)
        if ops:
            rows = [[op, *[text.get((op, d), "") for d in dtypes]] for op in ops]
            print(_table(rows, ["op", *dtypes]), file=out)
        for line in coverage_lines(name, cov) if cov else []:
            print(line, file=out)
    legend = ", ".join(f"{s}={v}" for v, s in SHORT.items())
    print(f"\n({legend}; r = worst measured error / bound, XFAIL left out; n/a = dtype not declared; "
          "(fwd) = forward only)", file=out)
    counts = summary_counts(results)
    print("totals: " + (", ".join(f"{v} {n}" for v, n in counts.items()) or "no cases"), file=out)
    if not any(r.verdict in JUDGED for r in results):
        print("nothing was compared: no selected op and dtype was judged (exit 3; --allow-empty accepts it)",
              file=out)
    skips = _skip_reasons(results)
    if skips:
        print("\nSKIP by reason:", file=out)
        print("\n".join(skips), file=out)
    xfails = [r for r in results if r.verdict == "XFAIL"]
    if xfails:
        print("\nXFAIL (expected failures):", file=out)
        for r in xfails:
            reason = " ".join(r.message.split(";")[0].split())
            print(f"  {r.id}: {reason[:160]}", file=out)
    noteworthy = sorted((r for r in results if r.verdict in NOTEWORTHY), key=lambda r: ORDER.index(r.verdict))
    if noteworthy:
        print("", file=out)
    for r in noteworthy:
        print("\n".join(_detail(r)), file=out)


def progress_printer(stream: TextIO | None = None, *, every: float = 30.0):
    """Progress on ``stream`` (stderr): a one-line bar on a terminal; otherwise (a CI log) one
    line per finished op and a line at least every ``every`` seconds."""
    stream = stream if stream is not None else sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        def bar(done: int, total: int, result: CaseResult) -> None:
            width = 30
            filled = int(width * done / max(total, 1))
            line = f"\r[{'#' * filled}{'-' * (width - filled)}] {done}/{total} {result.op} {result.dtype} " \
                   f"{result.verdict}"
            stream.write(line[:120].ljust(100))
            if done == total:
                stream.write("\n")
            stream.flush()

        return bar
    started = time.monotonic()
    state: dict[str, Any] = {"op": None, "last": started, "counts": Counter()}

    def lines(done: int, total: int, result: CaseResult) -> None:
        now = time.monotonic()
        key = (result.adapter, result.op)
        if state["op"] is not None and key != state["op"]:
            _flush_op(stream, state, done - 1, total, now - started)
        state["op"] = key
        state["counts"][result.verdict] += 1
        if done == total:
            _flush_op(stream, state, done, total, now - started)
        elif now - state["last"] >= every:
            stream.write(f"normref: {done}/{total} cases, {now - started:.0f} s, at {result.op} "
                         f"{result.dtype}\n")
            stream.flush()
            state["last"] = now

    return lines


def _flush_op(stream: TextIO, state: dict[str, Any], done: int, total: int, elapsed: float) -> None:
    adapter, op = state["op"]
    ordered = sorted(state["counts"].items(), key=lambda kv: ORDER.index(kv[0]))
    counts = " ".join(f"{SHORT[v]}{n}" for v, n in ordered)
    stream.write(f"normref: {done}/{total} cases, {elapsed:.0f} s: {adapter} {op} done ({counts})\n")
    stream.flush()
    state["counts"] = Counter()
    state["last"] = time.monotonic()


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
    text = json.dumps(doc, indent=2, default=str)
    if str(path) == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    else:
        Path(path).write_text(text)


def read_json(path: str | Path) -> tuple[dict[str, Any], list[CaseResult]]:
    """The inverse of :func:`to_json`: the run's metadata and its results (``normref merge``).
    A file that is not such a report raises ValueError naming it."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON report ({type(exc).__name__}: {exc})") from None
    return results_from_dict(doc, source=str(path))


def results_from_dict(doc: Any, *, source: str = "report") -> tuple[dict[str, Any], list[CaseResult]]:
    """The run's metadata and its results from a report already parsed from JSON (the dict
    :func:`to_json` writes); ValueError naming ``source`` when it is not such a report."""
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list):
        raise ValueError(f"{source}: not a normref JSON report (no 'cases' list; see normref check --json)")
    names = {f.name for f in fields(CaseResult)}
    results = []
    for i, rec in enumerate(doc["cases"]):
        try:
            values = {k: v for k, v in rec.items() if k in names}
            for key in ("worst_ratio", "max_abs_error", "max_rel_error", "bound"):
                values[key] = math.nan if values.get(key) is None else float(values[key])  # "inf" too
            results.append(CaseResult(**values))
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{source}: case #{i} is not a case record ({exc})") from None
    meta = {k: v for k, v in doc.items() if k not in ("cases", "summary")}
    return meta, results


def to_junit_xml(results: list[CaseResult], path: str | Path, *, suite: str = "normref",
                 allow_conventions: bool = False) -> None:
    """JUnit XML: one testcase per case; FAIL/XPASS (and CONVENTION, unless ``allow_conventions``)
    as failure, ERROR as error, SKIP/XFAIL as skipped."""
    failing = ("FAIL", "XPASS") + (() if allow_conventions else ("CONVENTION",))
    root = ET.Element("testsuites")
    by_adapter: dict[str, list[CaseResult]] = defaultdict(list)
    for r in results:
        by_adapter[r.adapter].append(r)
    for adapter, rs in by_adapter.items():
        ts = ET.SubElement(root, "testsuite", name=f"{suite}.{adapter}", tests=str(len(rs)),
                           failures=str(sum(r.verdict in failing for r in rs)),
                           errors=str(sum(r.verdict == "ERROR" for r in rs)),
                           skipped=str(sum(r.verdict in ("SKIP", "XFAIL") for r in rs)),
                           time=f"{sum(r.seconds_adapter + r.seconds_oracle for r in rs):.3f}")
        for r in rs:
            tc = ET.SubElement(ts, "testcase", classname=f"{suite}.{adapter}.{r.op}.{r.dtype}", name=r.case,
                               time=f"{r.seconds_adapter + r.seconds_oracle:.3f}")
            body = "\n".join(_detail(r))
            if r.verdict in failing:
                ET.SubElement(tc, "failure", message=f"{r.verdict}: {r.message}"[:500]).text = body
            elif r.verdict == "ERROR":
                ET.SubElement(tc, "error", message=r.message[:500]).text = body
            elif r.verdict in ("SKIP", "XFAIL"):
                ET.SubElement(tc, "skipped", message=f"{r.verdict}: {r.message}"[:500])
            else:
                ET.SubElement(tc, "system-out").text = body
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def to_markdown(results: list[CaseResult], path: str | Path, *, title: str = "normref conformance",
                coverage: dict[str, Coverage] | None = None) -> None:
    """A pull-request comment: the grid, the totals, and the noteworthy cases with repro lines."""
    lines = [f"### {title}"]
    by_adapter: dict[str, list[CaseResult]] = defaultdict(list)
    for r in results:
        by_adapter[r.adapter].append(r)
    for name in (list(coverage) if coverage else list(by_adapter)):
        cov = (coverage or {}).get(name)
        ops, dtypes, text = grid(by_adapter.get(name, []), cov)
        lines += ["", f"**{name}**", "", "| op | " + " | ".join(dtypes) + " |",
                  "|---|" + "---|" * len(dtypes)]
        lines += [f"| `{op}` | " + " | ".join(text.get((op, d), "") for d in dtypes) + " |" for op in ops]
        lines += [f"- {line}" for line in (coverage_lines(name, cov) if cov else [])]
    counts = summary_counts(results)
    lines += ["", "**Totals:** " + ", ".join(f"{v} {n}" for v, n in counts.items()), ""]
    noteworthy = [r for r in results if r.verdict in NOTEWORTHY]
    if noteworthy:
        lines += ["<details><summary>Noteworthy cases</summary>", "", "```"]
        for r in noteworthy:
            lines += _detail(r)
        lines += ["```", "</details>"]
    Path(path).write_text("\n".join(lines) + "\n")
