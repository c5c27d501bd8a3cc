"""The ``normref`` command line.

Verbs: ``list`` (the registered ops), ``show NAME`` (one op's spec: citation, equations, inputs,
hyper-parameters, dialect table).  Usage errors (unknown verb, op or option) print one line and
exit with status 2.  Heavy frameworks are never imported here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (status 2) instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _spec_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _fmt(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, sep, *body])


def cmd_list(args: argparse.Namespace) -> int:
    import reference

    specs = [reference.get(name).spec for name in reference.ops()]
    if args.family:
        specs = [s for s in specs if s.family == args.family]
    if args.json:
        records = [
            {
                "name": s.name,
                "family": s.family,
                "spec": _spec_path(s.path),
                "backward": s.backward,
                "tolerance": s.tolerance,
                "arxiv": s.citation.arxiv,
                "inputs": [t.name for t in s.inputs],
                "state": [t.name for t in s.state],
                "outputs": [t.name for t in s.outputs],
                "dialects": sorted(s.dialects),
                "summary": s.summary,
            }
            for s in specs
        ]
        print(json.dumps(records, indent=2))
        return 0
    rows = [[s.name, s.family, s.backward, ", ".join(sorted(s.dialects)), _spec_path(s.path)] for s in specs]
    print(_table(rows, ["op", "family", "backward", "dialects", "spec"]))
    return 0


def _show_record(spec: Any) -> dict[str, Any]:
    defaults = spec.defaults()
    return {
        "name": spec.name,
        "family": spec.family,
        "summary": spec.summary,
        "spec": _spec_path(spec.path),
        "citation": dict(spec.citation.__dict__),
        "backward": spec.backward,
        "tolerance": spec.tolerance,
        "properties": list(spec.properties),
        "inputs": [dict(t.__dict__) for t in spec.inputs],
        "state": [dict(t.__dict__) for t in spec.state],
        "outputs": [dict(t.__dict__) for t in spec.outputs],
        "hparams": {
            k: {"type": p.type, "default": p.default, "domain": p.domain(), "doc": p.doc}
            for k, p in spec.hparams.items()
        },
        "dialects": {
            name: {
                "api": d["api"],
                "source": d["source"],
                "notes": d["notes"],
                "differs_from_default": {
                    k: v for k, v in d["hparams"].items() if v != defaults.get(k)
                },
                "hparams": d["hparams"],
            }
            for name, d in spec.dialects.items()
        },
        "function": spec.function,
        "vjp": spec.vjp,
    }


def cmd_show(args: argparse.Namespace) -> int:
    import reference

    try:
        spec = reference.get(args.name).spec
    except KeyError as exc:
        print(f"normref show: error: {exc.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    record = _show_record(spec)
    if args.json:
        print(json.dumps(record, indent=2, default=list))
        return 0
    c = spec.citation
    out = [
        f"{spec.name} ({spec.family}) — {spec.summary}",
        "",
        f"Paper:     {c.title}" + (f" (arXiv:{c.arxiv})" if c.arxiv else ""),
        f"Equations: {c.equations}",
        f"Code:      {c.code}",
    ]
    if c.notes:
        out.append(f"Notes:     {c.notes}")
    out += [
        f"Spec:      {record['spec']}",
        f"Oracle:    {spec.function}  (VJP: {spec.vjp})",
        f"Backward:  {spec.backward}; tolerance class: {spec.tolerance}",
        "",
        "Inputs:",
    ]
    for t in spec.inputs:
        marks = (("differentiable", t.differentiable), ("optional", t.optional))
        flags = ", ".join(f for f, on in marks if on)
        out.append(f"  {t.name:<22} {t.shape}" + (f"  [{flags}]" if flags else ""))
    if spec.state:
        out.append("State:")
        out += [f"  {t.name:<22} {t.shape}" for t in spec.state]
    out.append("Outputs:")
    out += [f"  {t.name:<22} {t.shape}" for t in spec.outputs]
    out += ["", "Hyper-parameters:"]
    rows = [[k, _fmt(p.default), p.domain(), p.doc] for k, p in spec.hparams.items()]
    out.append(_table(rows, ["name", "default", "domain", "meaning"]))
    if spec.dialects:
        out += ["", "Dialects (values that differ from the defaults):"]
        rows = []
        for name, d in record["dialects"].items():
            diff = ", ".join(f"{k}={_fmt(v)}" for k, v in d["differs_from_default"].items()) or "(defaults)"
            rows.append([name, d["api"], diff])
        out.append(_table(rows, ["dialect", "api", "hyper-parameters"]))
    out += ["", "Properties checked: " + ", ".join(spec.properties)]
    print("\n".join(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="normref",
        description="Float64 oracle and conformance harness for normalizers, estimators and optimizers.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True

    p_list = sub.add_parser("list", help="list the registered ops", description="List the registered ops.")
    p_list.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p_list.add_argument("--family", help="only ops of this family (e.g. normalizers)")
    p_list.set_defaults(func=cmd_list)

    p_show = sub.add_parser(
        "show",
        help="show one op's spec",
        description="Show an op's citation, inputs, hyper-parameters and dialects.",
    )
    p_show.add_argument("name", help="op name, as printed by `normref list`")
    p_show.add_argument("--json", action="store_true", help="print the spec as JSON")
    p_show.set_defaults(func=cmd_show)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"normref {version('normref')}"
    except Exception:  # pragma: no cover - running from a source tree without metadata
        return "normref (source tree)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
