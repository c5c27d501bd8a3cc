"""``normref list`` and ``normref show NAME``: the registered ops and one op's spec (citation,
equations, inputs, state, outputs, hyper-parameters, dialect tables), as text or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["EXIT_USAGE", "cmd_list", "cmd_show"]

#: The exit status of a usage error (an unknown verb, op, adapter or option).
EXIT_USAGE = 2


def _backward(spec: Any) -> str:
    """The backward kind of the spec ("none" for a function of a step count; "-" for optimizers)."""
    return "-" if spec.is_optimizer else spec.backward


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
    rows = [[s.name, s.family, _backward(s), ", ".join(sorted(s.dialects)), _spec_path(s.path)]
            for s in specs]
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
        "backward_properties": list(spec.backward_properties),
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
        *([f"Oracle:    step {spec.function}, init {spec.init_state}",
           "Checked:   as a free-running trajectory (conformance/trajectory.py)"] if spec.is_optimizer else
          [f"Oracle:    {spec.function}  (VJP: {spec.vjp or 'none: no differentiable input'})",
           f"Backward:  {_backward(spec)}"
           + (f" (pinned by: {', '.join(spec.backward_properties)})" if spec.backward_properties else "")
           + "; bounds derived per case (conformance/tolerance.py)",
           *(["Checked:   as a free-running stream of batches, state carried (conformance/trajectory.py)"]
             if spec.kind == "stream" else [])]),
        "",
        "Inputs:",
    ]
    for t in spec.inputs:
        marks = (("differentiable", t.differentiable), ("optional", t.optional),
                 ("random draws: see conformance/distributional.py", t.draws))
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
