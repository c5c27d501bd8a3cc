"""``normref export DIR`` and ``normref judge DIR RESULTS``: golden vectors for a backend without
Python, and its results judged as ``normref check`` judges an adapter (conformance/golden.py,
conformance/golden_export.py, conformance/replay.py)."""

from __future__ import annotations

import argparse
import sys
import traceback

__all__ = ["cmd_export", "cmd_judge"]


def cmd_export(args: argparse.Namespace) -> int:
    from conformance import report, runner
    from conformance.adapters import load_adapter
    from conformance.cli import _usage_error, _workers
    from conformance.golden import Declaration
    from conformance.golden_export import export
    from conformance.support import ConfigurationError

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    try:
        if not dtypes:
            raise ValueError("--dtypes names no dtype; choose from float64,float32,float16,bfloat16")
        _workers(args.jobs, [])  # a bad $NORMREF_JOBS is a usage error, before the run
        if not runner.select_ops(args.ops):
            raise ValueError(f"--ops {args.ops!r} matches no registered op (normref list shows them)")
        if args.declare:
            declaration = Declaration.load(args.declare)
        elif args.adapter:
            declaration = Declaration.of(load_adapter(args.adapter))
        else:
            declaration = Declaration.default()
        summary = export(args.dir, declaration, ops=args.ops, dtypes=dtypes, seed=args.seed,
                         profile=args.profile, max_examples=args.max_examples, layout=args.layout,
                         with_expected=args.expected, jobs=lambda planned: _workers(args.jobs, planned))
    except (ValueError, TypeError, OSError, ConfigurationError) as exc:
        if args.traceback:
            traceback.print_exception(exc.__cause__ or exc)
        return _usage_error("export", str(exc))
    if not summary.cases:
        print(f"normref export: nothing to export: {declaration.name} declares none of the selected ops in "
              f"{', '.join(dtypes)}; nothing was written", file=sys.stderr)
        return report.EXIT_EMPTY
    print("\n".join(summary.lines(args.dir)))
    print(f"  next: compute the cases as {args.dir}/README.md says, then normref judge {args.dir} RESULTS")
    return report.EXIT_OK


def cmd_judge(args: argparse.Namespace) -> int:
    from conformance import replay, report, xfails
    from conformance.cli import _check_reports, _reports, _usage_error, _version, _workers
    from conformance.support import ConfigurationError

    try:
        _workers(args.jobs, [])
        _check_reports(args)
        expected = xfails.load(args.xfails)
        results, meta, coverage = replay.judge(
            args.dir, args.results, xfails=expected, timeout=args.timeout,
            jobs=lambda planned: _workers(args.jobs, planned),
            progress=report.progress_printer())
    except (ValueError, TypeError, OSError, ConfigurationError) as exc:
        return _usage_error("judge", str(exc))
    meta = {"normref_version": _version(), **meta}
    out = sys.stderr if args.json == "-" else sys.stdout
    return _reports(args, results, meta, coverage, out, verb="judge")
