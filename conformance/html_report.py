"""A self-contained HTML page of a run: the report people open in a browser.

The page is rendered from exactly the dict ``normref check --json`` (or ``normref merge --json``)
writes, so a JSON report of any age or machine can be turned into a page later.  It holds:

* the header: adapters with their framework information, normref version, seed, profile, dtypes,
  the ``--ops`` pattern, totals by verdict and the exit status with its meaning;
* per adapter, the op × dtype grid of the terminal report (the same cell text), each cell coloured
  by its worst error/bound ratio (:data:`BUCKETS`), with a tooltip naming the worst case;
* per op, the distribution of error/bound over its cases: an SVG histogram on a log scale with
  the bound (ratio 1) marked and one strip of ticks per dtype, and the MISTRUSTED and SKIP
  reasons counted;
* each FAIL, CONVENTION, ERROR and XPASS with its error, bound, ratio, diagnosis and the lines the
  terminal report prints (:func:`conformance.report.detail_lines`, ending in the repro line);
  the XFAILs with their reasons.

Nothing is fetched: CSS and SVG are inline, no script, no font or image from the network.  Every
text from the report is escaped, and the same JSON gives the same page byte for byte.  The numbers
are also in ``data-*`` attributes (cells: ``data-counts``, ``data-worst``; cases: ``data-ratio``,
``data-error``, ``data-bound``; totals: ``data-count``) so that tests and scripts can read them
back without parsing the text.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from html import escape
from pathlib import Path
from typing import Any

from conformance import report as text_report
from conformance.planning import Coverage
from conformance.runner import CaseResult

__all__ = ["BUCKETS", "EXIT_MEANING", "render_html", "write_html"]

#: The colour scale of a cell whose cases all passed (or were not judged): the upper end of
#: each bucket of the worst error/bound ratio, its CSS class and its legend text.
BUCKETS: tuple[tuple[float, str, str], ...] = (
    (0.1, "r1", "worst ratio ≤ 0.1"),
    (0.3, "r2", "≤ 0.3"),
    (0.6, "r3", "≤ 0.6"),
    (1.0, "r4", "≤ 1 (near the bound)"),
)

#: The meaning of each exit status of ``normref check`` and ``normref merge`` (README "Exit codes").
EXIT_MEANING = {
    text_report.EXIT_OK: "every judged case PASS (or MISTRUSTED, SKIP, XFAIL), and at least one case "
                         "was judged",
    text_report.EXIT_FAILED: "a case is FAIL, ERROR, XPASS (unless --no-strict-xpass) or CONVENTION "
                             "(unless --allow-conventions)",
    text_report.EXIT_EMPTY: "nothing was compared: every case was SKIP or MISTRUSTED, or none was "
                            "planned (--allow-empty exits 0)",
}

#: Verdict colours (badges, histogram bars, strip ticks).
COLOURS = {"PASS": "#2f9e44", "MISTRUSTED": "#adb5bd", "SKIP": "#dee2e6", "XFAIL": "#74c0fc",
           "CONVENTION": "#f08c00", "FAIL": "#e03131", "XPASS": "#9c36b5", "ERROR": "#862e9c"}

#: Verdicts plotted in the distributions, bottom to top of a histogram bar.
PLOTTED = ("PASS", "XFAIL", "MISTRUSTED", "CONVENTION", "XPASS", "FAIL", "ERROR")

# The histogram's x axis: log10(ratio) from LO to HI in bins of 1/STEPS decade, plus one bin on
# the left for exact agreement (ratio 0) and values below 10^LO, one on the right for values
# above 10^HI (and inf).
LO, HI, STEPS = -4, 3, 4
NBINS = (HI - LO) * STEPS + 2
BIN_W, GAP, LEFT, PLOT_H, STRIP_H = 14, 12, 74, 56, 11
SCALE0 = LEFT + BIN_W + GAP  # x of 10^LO
PLOT_W = NBINS * BIN_W + 2 * GAP


def write_html(report: dict[str, Any], path: str | Path, *, strict_xpass: bool = True,
               allow_conventions: bool = False, allow_empty: bool = False) -> None:
    """Write :func:`render_html` of ``report`` to ``path`` (UTF-8).

    ``report`` is the dict ``normref check --json`` writes; the keyword arguments are the run's
    gate options, which decide the exit status the header states.
    """
    Path(path).write_text(render_html(report, strict_xpass=strict_xpass, allow_conventions=allow_conventions,
                                      allow_empty=allow_empty), encoding="utf-8")


def render_html(report: dict[str, Any], *, strict_xpass: bool = True, allow_conventions: bool = False,
                allow_empty: bool = False) -> str:
    """The page of ``report`` (the dict ``normref check --json`` writes) as one HTML string.

    ValueError when ``report`` is not such a dict (see
    :func:`conformance.report.results_from_dict`).
    """
    meta, results = text_report.results_from_dict(report, source="report")
    coverage = {name: Coverage(**cov) for name, cov in (meta.get("coverage") or {}).items()}
    by_adapter: dict[str, list[CaseResult]] = defaultdict(list)
    for r in results:
        by_adapter[r.adapter].append(r)
    names = list(coverage) or list(by_adapter)
    names += [n for n in by_adapter if n not in names]
    gate = {"strict_xpass": strict_xpass, "allow_conventions": allow_conventions, "allow_empty": allow_empty}
    status = text_report.exit_code(results, **gate)
    by_verdict: dict[str, list[CaseResult]] = defaultdict(list)
    for r in results:
        by_verdict[r.verdict].append(r)
    # The verdicts that fail the run under these options (exit_code is their one definition).
    failing = {v: len(rs) for v, rs in by_verdict.items()
               if text_report.exit_code(rs, **gate) == text_report.EXIT_FAILED}
    noteworthy = sorted((r for r in results if r.verdict in text_report.NOTEWORTHY),
                        key=lambda r: text_report.ORDER.index(r.verdict))
    xfails = [r for r in results if r.verdict == "XFAIL"]
    title = "normref: " + ", ".join(names) if names else "normref report"
    flags = (("--no-strict-xpass", not strict_xpass), ("--allow-conventions", allow_conventions),
             ("--allow-empty", allow_empty))
    options = [flag for flag, on in flags if on]
    exit_line = _exit_line(status, options, {v: failing[v] for v in text_report.ORDER if v in failing})
    body = [_header(meta, results, names, exit_line, noteworthy, xfails)]
    for k, name in enumerate(names):
        body.append(_adapter_section(k, name, by_adapter.get(name, []), coverage.get(name), len(names) > 1))
    body.append(_noteworthy_section(noteworthy))
    if xfails:
        body.append(_xfail_section(xfails))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# --------------------------------------------------------------------------------------------
# Numbers and small pieces
# --------------------------------------------------------------------------------------------


def _num(x: float) -> str:
    """A float for a data-* attribute: repr, so that it reads back exactly (nan, inf too)."""
    return repr(float(x))


def _g(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if math.isfinite(x) else str(x)


def _attrs(**attrs: Any) -> str:
    return "".join(f' {k.replace("_", "-")}="{escape(str(v))}"' for k, v in attrs.items() if v is not None)


def _badge(verdict: str, count: int | None = None) -> str:
    label = verdict if count is None else f"{verdict} {count}"
    extra = _attrs(data_verdict=verdict, data_count=count)
    return f'<span class="badge v-{escape(verdict)}"{extra}>{escape(label)}</span>'


def _worst_ratio(rs: list[CaseResult]) -> tuple[float, CaseResult | None]:
    """The grid's worst ratio of a cell (over the verdicts whose ratio it shows) and its case."""
    worst, at = 0.0, None
    for r in rs:
        if r.verdict in text_report.RATIO_VERDICTS and math.isfinite(r.worst_ratio) and r.worst_ratio > worst:
            worst, at = r.worst_ratio, r
    return worst, at


def _cell_class(counts: Counter[str], worst: float) -> str:
    """The colour of a grid cell: a verdict that fails the run first, then the worst ratio."""
    for verdict, cls in (("ERROR", "c-error"), ("FAIL", "c-fail"), ("XPASS", "c-xpass"),
                         ("CONVENTION", "c-conv")):
        if counts[verdict]:
            return cls
    if worst > 1.0:  # not reached by the harness's own verdicts; a hand-made report may hold it
        return "c-fail"
    if not any(counts[v] for v in text_report.RATIO_VERDICTS):
        return "c-grey" if counts else "c-empty"
    return next(f"c-{cls}" for upper, cls, _ in BUCKETS if worst <= upper)


def _reason(r: CaseResult) -> str:
    """Why a MISTRUSTED or SKIP case judged nothing: a SKIP's message; a MISTRUSTED case's note
    after its comparison (``... ratio 0.0155 — the bound exceeds ...``)."""
    message = " ".join(r.message.split())
    if r.verdict == "MISTRUSTED" and " — " in message:
        return message.split(" — ", 1)[1]
    return message


# --------------------------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------------------------


def _exit_line(status: int, options: list[str], failing: dict[str, int]) -> str:
    """The exit status ``normref check`` gives this report (under the gate ``options``), its
    meaning, and the counts of the verdicts that fail the run."""
    state = {text_report.EXIT_OK: "ok", text_report.EXIT_FAILED: "bad"}.get(status, "empty")
    meaning = EXIT_MEANING.get(status, "")
    if failing:
        meaning += ": " + ", ".join(f"{v} {n}" for v, n in failing.items())
    under = f" (with {' '.join(options)})" if options else ""
    return (f'<div class="exit exit-{state}" data-exit="{status}"><b>exit status {status}</b>'
            f"{escape(under)}: {escape(meaning)}</div>")


def _header(meta: dict[str, Any], results: list[CaseResult], names: list[str], exit_line: str,
            noteworthy: list[CaseResult], xfails: list[CaseResult]) -> str:
    rows = []
    infos = meta.get("adapters") or {}
    for name in names:
        info = infos.get(name) or next((r.framework for r in results if r.adapter == name), {})
        parts = [f"{escape(str(k))} <b>{escape(str(v))}</b>" for k, v in info.items()]
        rows.append((f"adapter <code>{escape(name)}</code>", " · ".join(parts) or "—"))
    version = meta.get("normref_version") or next((r.normref_version for r in results), "?")
    rows.append(("normref", escape(str(version))))
    for key, label in (("seed", "seed"), ("profile", "profile"), ("ops", "--ops"), ("shard", "shard")):
        if meta.get(key) is not None:
            rows.append((label, f"<code>{escape(str(meta[key]))}</code>"))
    if meta.get("dtypes"):
        rows.append(("dtypes", escape(", ".join(str(d) for d in meta["dtypes"]))))
    if meta.get("merged_from"):
        rows.append(("merged from", escape(", ".join(str(p) for p in meta["merged_from"]))))
    counts = text_report.summary_counts(results)
    total = sum(counts.values())
    totals = " ".join(_badge(v, n) for v, n in counts.items()) or "no cases"
    rows.append(("totals", f'<span class="totals" data-total="{total}">{totals} '
                 f'<span class="muted">({total} cases)</span></span>'))
    table = "\n".join(f"<tr><th>{label}</th><td>{value}</td></tr>" for label, value in rows)
    nav = ['<a href="#grid-0">grid</a>', '<a href="#dist-0">distributions</a>',
           f'<a href="#noteworthy">FAIL/CONVENTION/ERROR/XPASS ({len(noteworthy)})</a>']
    if xfails:
        nav.append(f'<a href="#xfail">XFAIL ({len(xfails)})</a>')
    return (f'<header>\n<h1>normref conformance report</h1>\n'
            f'{exit_line}\n<table class="meta">\n{table}\n</table>\n'
            f'<nav>{" · ".join(nav)}</nav>\n</header>')


# --------------------------------------------------------------------------------------------
# Grid and distributions
# --------------------------------------------------------------------------------------------


def _adapter_section(k: int, name: str, results: list[CaseResult], cov: Coverage | None,
                     several: bool) -> str:
    ops, dtypes, text = text_report.grid(results, cov)
    cells: dict[tuple[str, str], list[CaseResult]] = defaultdict(list)
    for r in results:
        cells[(r.op, r.dtype)].append(r)
    head = "".join(f"<th>{escape(d)}</th>" for d in dtypes)
    rows = []
    for i, op in enumerate(ops):
        tds = [f'<th class="op"><a href="#op-{k}-{i}">{escape(op)}</a></th>']
        for dtype in dtypes:
            tds.append(_cell(op, dtype, cells.get((op, dtype), []), text.get((op, dtype), "")))
        rows.append(f"<tr>{''.join(tds)}</tr>")
    heading = f"<h2>{escape(name)}</h2>\n" if several else ""
    lines = text_report.coverage_lines(name, cov) if cov else []
    notes = "".join(f"<li>{escape(line)}</li>" for line in lines)
    grid_html = (f'<table class="grid" id="grid-{k}" data-adapter="{escape(name)}">\n'
                 f'<thead><tr><th>op</th>{head}</tr></thead>\n<tbody>\n' + "\n".join(rows)
                 + "\n</tbody>\n</table>") if ops else "<p>no op of this adapter was selected</p>"
    cards = [_op_card(k, i, op, [r for r in results if r.op == op], dtypes) for i, op in enumerate(ops)]
    return (f'<section class="adapter">\n{heading}<h3>op × dtype</h3>\n{grid_html}\n{_legend()}\n'
            + (f'<ul class="notes">{notes}</ul>\n' if notes else "")
            + f'<h3 id="dist-{k}">error / bound per op</h3>\n'
            + '<p class="muted">Each case\'s worst measured error divided by its bound, on a log scale; '
              'the red line is the bound (ratio 1): a correct implementation stays left of it. Bars: '
              f'cases per 1/{STEPS} decade by verdict (the first bar: ratio 0 and below 10<sup>{LO}</sup>; '
              f'the last, ∞: above 10<sup>{HI}</sup> and infinite); below, one tick per case and dtype '
              '(hover for the case).</p>\n'
            + '<div class="cards">\n' + "\n".join(cards) + "\n</div>\n</section>")


def _cell(op: str, dtype: str, rs: list[CaseResult], text: str) -> str:
    attrs = {"data_op": op, "data_dtype": dtype}
    if text == "n/a":
        return f'<td class="c-na"{_attrs(**attrs, data_na="1")} title="{escape(dtype)} not declared">n/a</td>'
    counts = Counter(r.verdict for r in rs)
    worst, at = _worst_ratio(rs)
    ordered = {v: counts[v] for v in text_report.ORDER if counts[v]}
    fwd = text.endswith("(fwd)")
    tip = [f"{op} × {dtype}: {len(rs)} case{'s' * (len(rs) != 1)}",
           ", ".join(f"{v} {n}" for v, n in ordered.items()) or "no case in this report"]
    if at is not None:
        tip.append(f"worst ratio {_g(worst, 4)}: {at.id}")
        if at.worst:
            tip.append(f"  {at.worst} at step {at.step}: |err| {_g(at.max_abs_error)}, bound {_g(at.bound)}")
    if fwd:
        tip.append("forward only: gradients not checked")
    counts_text, _, ratio_text = text.removesuffix(" (fwd)").partition(" r=")
    inner = f'<span class="counts">{escape(counts_text)}</span>'
    if ratio_text:
        inner += f' <span class="ratio">r={escape(ratio_text)}</span>'
    if fwd:
        inner += ' <span class="fwd">(fwd)</span>'
    attrs.update(data_counts=json.dumps(ordered, sort_keys=True), data_worst=_num(worst),
                 data_fwd="1" if fwd else None)
    return (f'<td class="{_cell_class(counts, worst)}"{_attrs(**attrs)} title="{escape(chr(10).join(tip))}">'
            f"{inner}</td>")


def _legend() -> str:
    items = [f'<span class="sw c-{cls}"></span>{escape(label)}' for _, cls, label in BUCKETS]
    items += ['<span class="sw c-fail"></span>FAIL (ratio &gt; 1)',
              '<span class="sw c-conv"></span>CONVENTION', '<span class="sw c-xpass"></span>XPASS',
              '<span class="sw c-error"></span>ERROR',
              '<span class="sw c-grey"></span>only MISTRUSTED / SKIP / XFAIL',
              '<span class="sw c-na"></span>n/a: dtype not declared', "(fwd): forward only"]
    short = ", ".join(f"{s}={v}" for v, s in text_report.SHORT.items())
    return (f'<div class="legend">{" ".join(f"<span>{i}</span>" for i in items)}</div>\n'
            f'<p class="muted">{escape(short)}; r = worst measured error / bound over PASS, FAIL, '
            'CONVENTION and XPASS cases (XFAIL left out); a cell is coloured by the verdict that fails '
            'the run, else by r.</p>')


def _bin(ratio: float) -> int:
    if ratio == 0 or (math.isfinite(ratio) and math.log10(ratio) < LO):
        return 0
    if not math.isfinite(ratio) or math.log10(ratio) >= HI:
        return NBINS - 1
    return 1 + int((math.log10(ratio) - LO) * STEPS)


def _bin_x(b: int) -> float:
    """The left edge of bin ``b``: the two end bins stand apart from the log scale."""
    if b == 0:
        return LEFT
    return SCALE0 + (b - 1) * BIN_W + (GAP if b == NBINS - 1 else 0)


def _x(ratio: float) -> float:
    """A tick's x position: on the log scale, or in the middle of an end bin."""
    b = _bin(ratio)
    if b in (0, NBINS - 1):
        return _bin_x(b) + BIN_W / 2
    return SCALE0 + (math.log10(ratio) - LO) * STEPS * BIN_W


def _plotted(r: CaseResult) -> bool:
    """A case with a measured ratio (a comparison was made; NaN is not a measurement)."""
    return r.verdict in PLOTTED and bool(r.worst) and not math.isnan(r.worst_ratio)


def _op_card(k: int, i: int, op: str, rs: list[CaseResult], dtypes: list[str]) -> str:
    """One op's card: its verdict counts, the distribution of its ratios, why cases judged
    nothing."""
    counts = Counter(r.verdict for r in rs)
    badges = " ".join(_badge(v, counts[v]) for v in text_report.ORDER if counts[v])
    plotted = [r for r in rs if _plotted(r)]
    unplotted = Counter(r.verdict for r in rs if r.verdict != "SKIP" and not _plotted(r))
    note = ""
    if unplotted:
        n = sum(unplotted.values())
        note = (f'<p class="muted">not plotted (no error measured): {n} case{"s" * (n != 1)}, '
                + ", ".join(f"{v} {unplotted[v]}" for v in text_report.ORDER if unplotted[v]) + "</p>")
    reasons = _reasons(rs, dtypes)
    return (f'<div class="card" id="op-{k}-{i}"'
            f'{_attrs(data_op=op, data_plotted=len(plotted), data_unplotted=sum(unplotted.values()))}>\n'
            f"<h4>{escape(op)} {badges}</h4>\n{_distribution_svg(op, plotted, dtypes)}\n{note}"
            + (f'<ul class="reasons">{reasons}</ul>' if reasons else "") + "\n</div>")


def _reasons(rs: list[CaseResult], dtypes: list[str]) -> str:
    """The MISTRUSTED and SKIP cases grouped by reason, most frequent first, with their dtypes."""
    items = []
    order = {d: n for n, d in enumerate(dtypes)}
    for verdict in ("MISTRUSTED", "SKIP"):
        groups: dict[str, list[CaseResult]] = defaultdict(list)
        for r in rs:
            if r.verdict == verdict:
                groups[_reason(r)].append(r)
        for reason, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            where = sorted({r.dtype for r in members}, key=lambda d: (order.get(d, len(order)), d))
            items.append(f'<li{_attrs(data_verdict=verdict, data_count=len(members))}>'
                         f'{_badge(verdict, len(members))} <span class="muted">{escape(", ".join(where))}'
                         f"</span> {escape(reason)}</li>")
    return "".join(items)


def _distribution_svg(op: str, plotted: list[CaseResult], dtypes: list[str]) -> str:
    """The histogram of the cases' ratios by verdict on a log scale, the bound at 1 marked, and
    one strip of ticks per dtype (a tooltip per case)."""
    bins: list[Counter[str]] = [Counter() for _ in range(NBINS)]
    for r in plotted:
        bins[_bin(r.worst_ratio)][r.verdict] += 1
    top = max((sum(b.values()) for b in bins), default=0) or 1
    strips = [d for d in dtypes if any(r.dtype == d for r in plotted)]
    strips += sorted({r.dtype for r in plotted} - set(strips))
    width, axis_y = LEFT + PLOT_W + 8, PLOT_H + 4 + STRIP_H * len(strips) + 12
    svg = [f'<svg class="dist" width="{width}" height="{axis_y + 6}" viewBox="0 0 {width} {axis_y + 6}" '
           f'role="img" aria-label="error/bound distribution of {escape(op)}">',
           f'<rect x="{LEFT}" y="0" width="{PLOT_W}" height="{PLOT_H}" class="plotbg"/>']
    for e in range(LO, HI + 1):
        x = SCALE0 + (e - LO) * STEPS * BIN_W
        svg.append(f'<line x1="{x}" x2="{x}" y1="0" y2="{axis_y - 10}" class="grid"/>'
                   f'<text x="{x}" y="{axis_y}" class="lab" text-anchor="middle">{_decade(e)}</text>')
    for b, label in ((0, "0"), (NBINS - 1, "∞")):
        svg.append(f'<text x="{_bin_x(b) + BIN_W / 2}" y="{axis_y}" class="lab" '
                   f'text-anchor="middle">{label}</text>')
    for b, counter in enumerate(bins):
        y = float(PLOT_H)
        for verdict in PLOTTED:
            n = counter[verdict]
            if n:
                h = max(PLOT_H * n / top, 2.0)
                y -= h
                svg.append(f'<rect x="{_bin_x(b) + 1}" y="{y:.1f}" width="{BIN_W - 2}" height="{h:.1f}" '
                           f'fill="{COLOURS[verdict]}" data-n="{n}"><title>{escape(_bin_label(b))}: '
                           f"{n} {verdict}</title></rect>")
    svg.append(f'<text x="{LEFT - 4}" y="10" class="lab" text-anchor="end">{top}</text>'
               f'<text x="{LEFT - 4}" y="{PLOT_H}" class="lab" text-anchor="end">0</text>')
    for j, dtype in enumerate(strips):
        y0, y1 = PLOT_H + 4 + j * STRIP_H, PLOT_H + 2 + (j + 1) * STRIP_H
        svg.append(f'<text x="{LEFT - 4}" y="{y1}" class="lab" text-anchor="end">{escape(dtype)}</text>'
                   f'<rect x="{LEFT}" y="{y0}" width="{PLOT_W}" height="{STRIP_H - 2}" class="stripbg"/>')
        mine = [r for r in plotted if r.dtype == dtype]
        for r in sorted(mine, key=lambda r: (PLOTTED.index(r.verdict), r.id)):
            x = _x(r.worst_ratio)
            svg.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0}" y2="{y1}" stroke="{COLOURS[r.verdict]}">'
                       f"<title>{escape(r.id)}: {r.verdict}, ratio {escape(_g(r.worst_ratio))} "
                       f"({escape(r.worst)})</title></line>")
    one = SCALE0 - LO * STEPS * BIN_W
    svg.append(f'<line x1="{one}" x2="{one}" y1="0" y2="{axis_y - 10}" class="bound"><title>the bound: '
               "error / bound = 1</title></line></svg>")
    return "".join(svg)


def _decade(e: int) -> str:
    return {0: "1", 1: "10"}.get(e, f"1e{e}")


def _bin_label(b: int) -> str:
    if b == 0:
        return f"ratio 0 or below 1e{LO}"
    if b == NBINS - 1:
        return f"ratio above 1e{HI} (or inf)"
    lo = LO + (b - 1) / STEPS
    return f"ratio 10^{lo:.2f} to 10^{lo + 1 / STEPS:.2f}"


# --------------------------------------------------------------------------------------------
# Noteworthy cases and XFAILs
# --------------------------------------------------------------------------------------------


def _noteworthy_section(noteworthy: list[CaseResult]) -> str:
    """One row per FAIL, CONVENTION, ERROR and XPASS (in the terminal report's order): the worst
    quantity, its error, bound and ratio, the diagnosis, the repro line, and the terminal's lines
    for the case under "lines"."""
    heading = "FAIL, CONVENTION, ERROR, XPASS"
    if not noteworthy:
        return f'<section id="noteworthy"><h2>{heading}</h2><p>none</p></section>'
    rows = []
    for r in noteworthy:
        attrs = _attrs(data_id=r.id, data_verdict=r.verdict, data_ratio=_num(r.worst_ratio),
                       data_error=_num(r.max_abs_error), data_bound=_num(r.bound),
                       data_error_kind=r.error_kind or None)
        measured = ["", "", "", ""]
        if r.worst:
            measured = [f"{r.worst} (step {r.step})", _g(r.max_abs_error), _g(r.bound), _g(r.worst_ratio)]
        kind = f"[{r.error_kind}] " if r.error_kind else ""
        what = escape(r.diagnosis or kind + " ".join(r.message.split()))
        if r.diagnosis:
            declared = ", ".join(f"{k}={v!r}" for k, v in r.dialect.items())
            what += f'<div class="muted">declared: {escape(declared)}</div>'
        lines = escape("\n".join(text_report.detail_lines(r)))
        rows.append(f'<tr class="e-{escape(r.verdict)}"{attrs}><td>{_badge(r.verdict)}</td>'
                    f'<td><code>{escape(r.id)}</code><div class="repro">$ <code>{escape(r.repro)}</code>'
                    f'</div></td><td class="nowrap"><code>{escape(measured[0])}</code></td>'
                    + "".join(f'<td class="num">{escape(m)}</td>' for m in measured[1:])
                    + f'<td class="what">{what}<details><summary>lines</summary><pre>{lines}</pre>'
                    "</details></td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("verdict", "case and repro", "worst quantity", "max |err|",
                                               "bound", "ratio", "diagnosis or message"))
    return (f'<section id="noteworthy"><h2>{heading} ({len(noteworthy)})</h2>\n'
            f'<table class="noteworthy"><thead><tr>{head}</tr></thead><tbody>\n'
            + "\n".join(rows) + "\n</tbody></table>\n</section>")


def _xfail_section(xfails: list[CaseResult]) -> str:
    rows = []
    for r in xfails:
        reason = " ".join(r.message.split())
        ratio = f"ratio {_g(r.worst_ratio)}" if r.worst and math.isfinite(r.worst_ratio) else ""
        rows.append(f'<tr data-id="{escape(r.id)}" data-ratio="{_num(r.worst_ratio)}">'
                    f'<td><code>{escape(r.id)}</code></td><td class="num">{escape(ratio)}</td>'
                    f'<td>{escape(reason)}</td></tr>')
    return (f'<section id="xfail"><h2>XFAIL: expected failures ({len(xfails)})</h2>\n'
            '<table class="xfail">' + "\n".join(rows) + "</table>\n</section>")


_CSS = """
:root { --fg: #1d2125; --muted: #5c636a; --line: #dee2e6; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color: var(--fg); margin: 0 auto; padding: 20px 28px 60px; max-width: 1400px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 10px; }
h2 { font-size: 19px; margin: 30px 0 8px; border-bottom: 2px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 16px; margin: 22px 0 8px; }
h4 { font-size: 14px; margin: 0 0 6px; }
code, pre, .num, .grid td { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono",
  monospace; font-size: 12.5px; }
a { color: #1864ab; text-decoration: none; } a:hover { text-decoration: underline; }
.muted { color: var(--muted); }
.exit { padding: 8px 12px; border-radius: 6px; margin: 0 0 12px; border-left: 6px solid; }
.exit-ok { background: #ebfbee; border-color: #2f9e44; }
.exit-bad { background: #fff5f5; border-color: #e03131; }
.exit-empty { background: #f8f9fa; border-color: #868e96; }
table.meta { border-collapse: collapse; margin-bottom: 8px; }
table.meta th { text-align: left; font-weight: 600; padding: 2px 16px 2px 0; color: var(--muted);
  vertical-align: top; white-space: nowrap; }
table.meta td { padding: 2px 0; }
nav { margin: 8px 0; }
.badge { display: inline-block; padding: 0 7px; border-radius: 10px; font-size: 12px; font-weight: 600;
  color: #fff; margin: 1px 2px 1px 0; white-space: nowrap; vertical-align: 1px; }
.v-PASS { background: #2f9e44; } .v-FAIL { background: #e03131; } .v-ERROR { background: #862e9c; }
.v-CONVENTION { background: #f08c00; } .v-XPASS { background: #9c36b5; } .v-XFAIL { background: #1c7ed6; }
.v-MISTRUSTED { background: #868e96; } .v-SKIP { background: #ced4da; color: #343a40; }
table.grid { border-collapse: separate; border-spacing: 2px; }
table.grid th { text-align: left; font-weight: 600; padding: 3px 8px; }
table.grid thead th { border-bottom: 2px solid var(--line); }
table.grid td { padding: 4px 8px; border-radius: 3px; white-space: nowrap; min-width: 120px; }
table.grid td .ratio { font-weight: 700; }
table.grid td .fwd { font-style: italic; }
.c-r1 { background: #69db7c; } .c-r2 { background: #b2f2bb; } .c-r3 { background: #e9fac8; }
.c-r4 { background: #ffe066; }
.c-fail { background: #ff8787; } .c-error { background: #b8328f; color: #fff; }
.c-conv { background: #ffc078; } .c-xpass { background: #e599f7; }
.c-grey { background: #e9ecef; color: #495057; } .c-empty { background: #fff; }
.c-na { background: repeating-linear-gradient(135deg, #f8f9fa 0 6px, #f1f3f5 6px 12px); color: #adb5bd;
  text-align: center; }
.legend { margin: 8px 0 2px; display: flex; flex-wrap: wrap; gap: 4px 16px; font-size: 12.5px; }
.sw { display: inline-block; width: 14px; height: 14px; border-radius: 3px; vertical-align: -2px;
  margin-right: 5px; border: 1px solid #ced4da; }
ul.notes { color: var(--muted); margin: 6px 0; padding-left: 20px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; }
.card p { margin: 4px 0 0; font-size: 12.5px; }
svg.dist { display: block; margin-top: 4px; }
svg .plotbg { fill: #fcfcfd; stroke: #e9ecef; } svg .stripbg { fill: #f8f9fa; }
svg .grid { stroke: #e9ecef; } svg .bound { stroke: #e03131; stroke-width: 2; stroke-dasharray: 4 2; }
svg .lab { font: 10px ui-monospace, Menlo, Consolas, "DejaVu Sans Mono", monospace; fill: #5c636a; }
svg line { stroke-width: 1.5; }
ul.reasons { margin: 6px 0 0; padding-left: 0; list-style: none; font-size: 12.5px; }
ul.reasons li { margin: 2px 0; }
table.noteworthy { border-collapse: collapse; width: 100%; }
table.noteworthy th { text-align: left; font-weight: 600; padding: 4px 8px;
  border-bottom: 2px solid var(--line);
  white-space: nowrap; }
table.noteworthy td { padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
table.noteworthy td.num { text-align: right; white-space: nowrap; }
table.noteworthy td.nowrap { white-space: nowrap; }
table.noteworthy td.what { max-width: 560px; overflow-wrap: anywhere; }
table.noteworthy tr.e-FAIL td:first-child { border-left: 5px solid #e03131; }
table.noteworthy tr.e-ERROR td:first-child { border-left: 5px solid #862e9c; }
table.noteworthy tr.e-CONVENTION td:first-child { border-left: 5px solid #f08c00; }
table.noteworthy tr.e-XPASS td:first-child { border-left: 5px solid #9c36b5; }
details summary { cursor: pointer; color: #1864ab; font-size: 12px; margin-top: 3px; }
details pre { margin-top: 4px; }
pre { background: #f8f9fa; border: 1px solid #e9ecef; border-radius: 4px; padding: 8px 10px; margin: 0;
  overflow-x: auto; white-space: pre-wrap; overflow-wrap: anywhere; }
.repro { margin-top: 3px; color: var(--muted); font-size: 12px; }
.repro code { font-size: 11.5px; }
table.xfail { border-collapse: collapse; } table.xfail td { border-top: 1px solid var(--line);
  padding: 4px 10px 4px 0; vertical-align: top; } table.xfail td.num { white-space: nowrap; }
"""
