"""The ``normref`` command line.

Verbs: ``list`` (the registered ops), ``show NAME`` (one op's spec: citation, equations, inputs,
hyper-parameters, dialect table), ``check [ADAPTER]`` (run the conformance cases through a
framework adapter and report; ``--jobs N`` in worker processes, ``--shard K/N`` a part of the
run), ``merge REPORT...`` (join the JSON reports of shards into one), ``repro CASE-ID`` (rerun one
case and print inputs, both results and the difference), ``export DIR`` (golden vectors for a
backend without Python) and ``judge DIR RESULTS`` (that backend's results judged as ``check``
judges an adapter; conformance/cli_golden.py).  Usage errors (unknown verb, op, adapter or
option) print one line and exit with status 2; ``check``, ``merge`` and ``judge`` exit as in the
README's exit-code table.  Heavy frameworks are imported only by the adapter that needs them,
when a check runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from conformance.cli_golden import cmd_export, cmd_judge
from conformance.cli_specs import EXIT_USAGE, cmd_list, cmd_show

__all__ = ["EXIT_USAGE", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (status 2) instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _usage_error(verb: str, message: str) -> int:
    print(f"normref {verb}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        k, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like K/N (e.g. 2/4), got {text!r}") from None
    if not 1 <= k <= n:
        raise ValueError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def _check_output(option: str, path: str | None) -> None:
    """A report path must be writable before a run starts (not after it, with the run lost)."""
    if not path or (option == "--json" and path == "-"):
        return
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise ValueError(f"{option} {path!r} is a directory, not a file")
    if not parent.is_dir():
        raise ValueError(f"{option} {path!r}: the directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"{option} {path!r} is not writable")


def _check_reports(args: argparse.Namespace) -> None:
    """Every report path asked for is writable, and ``--html`` has its writer (before a run)."""
    for option, path in (("--json", args.json), ("--junit-xml", args.junit_xml),
                         ("--markdown", args.markdown), ("--html", args.html)):
        _check_output(option, path)
    if args.html:
        import importlib.util

        if importlib.util.find_spec("conformance.html_report") is None:
            raise ValueError("--html needs conformance/html_report.py, which this normref does not have")


def _write_html(args: argparse.Namespace, results: list[Any], meta: dict[str, Any]) -> None:
    """The HTML report, from exactly the document ``--json`` writes (and the run's gate options,
    which decide the exit status its header states)."""
    import contextlib
    import io
    import json

    from conformance import report
    from conformance.html_report import write_html

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        report.to_json(results, "-", meta=meta)
    write_html(json.loads(text.getvalue()), args.html, strict_xpass=not args.no_strict_xpass,
               allow_conventions=args.allow_conventions, allow_empty=args.allow_empty)


def _adapters(args: argparse.Namespace) -> list[Any]:
    from conformance.adapters import available_builtin, load_adapter

    names = [args.adapter] if args.adapter else [n for n in available_builtin() if n != "numpy32"]
    return [load_adapter(n) for n in (names or ["numpy32"])]


def cmd_check(args: argparse.Namespace) -> int:
    from conformance import report, runner, xfails
    from conformance.support import ConfigurationError

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes:
        return _usage_error("check", "--dtypes names no dtype; choose from float64,float32,float16,bfloat16")
    try:
        from conformance import oracle_device

        oracle_device.select(args.oracle_device)  # validates $NORMREF_BACKEND too; --jobs workers inherit it
        shard = _parse_shard(args.shard)
        _workers(args.jobs, [])  # a bad $NORMREF_JOBS is a usage error, before the run
        _check_reports(args)
        expected = xfails.load(args.xfails)
        if not runner.select_ops(args.ops):
            raise ValueError(f"--ops {args.ops!r} matches no registered op (normref list shows them)")
        adapters = _adapters(args)
        plans, coverage = {}, {}
        for adapter in adapters:
            planned = runner.plan(adapter, ops=args.ops, dtypes=dtypes, seed=args.seed,
                                  profile=args.profile, max_examples=args.max_examples)
            coverage[adapter.name] = runner.coverage(adapter, ops=args.ops, dtypes=dtypes)
            if shard:
                planned = [c for i, c in enumerate(planned) if i % shard[1] == shard[0] - 1]
            plans[adapter.name] = (adapter, planned)
    except (ValueError, TypeError, OSError, ConfigurationError) as exc:
        if args.traceback:
            traceback.print_exception(exc.__cause__ or exc)
        return _usage_error("check", str(exc))
    out = sys.stderr if args.json == "-" else sys.stdout
    if not any(planned for _, planned in plans.values()):
        selected = next(iter(coverage.values())).selected
        what = (f"{', '.join(plans)} implements none of the selected ops in {', '.join(dtypes)}: "
                f"{', '.join(selected[:8])}{' ...' if len(selected) > 8 else ''}")
        print(f"normref check: nothing to compare: {what}", file=sys.stderr)
        return report.EXIT_OK if args.allow_empty else report.EXIT_EMPTY
    results = []
    progress = report.progress_printer()
    for adapter, planned in plans.values():
        results += runner.run(adapter, planned, profile=args.profile, xfails=expected, progress=progress,
                              timeout=args.timeout, jobs=_workers(args.jobs, planned))
    if expected:
        possible = [i for adapter, _ in plans.values() for i in runner.possible_ids(adapter, seed=args.seed)]
        for pattern in expected.stale(possible):
            print(f"normref check: warning: xfail entry {pattern!r} ({args.xfails}) matches no case "
                  "the adapter could run", file=sys.stderr)
    meta = {"normref_version": _version(), "adapters": {a.name: a.info() for a, _ in plans.values()},
            "seed": args.seed, "profile": args.profile, "dtypes": dtypes, "ops": args.ops,
            "shard": args.shard or None,
            "coverage": {name: cov.__dict__ for name, cov in coverage.items()}}
    return _reports(args, results, meta, coverage, out)


def _reports(args: argparse.Namespace, results: list[Any], meta: dict[str, Any], coverage: dict[str, Any],
             out: Any, verb: str = "check") -> int:
    """The terminal report, the files asked for, and the exit status (check, merge and judge)."""
    from conformance import report

    title = f"normref {verb}: " + ", ".join(f"{name} ({info.get('version', '?')})"
                                            for name, info in meta["adapters"].items())
    report.terminal(results, out, title=title, coverage=coverage)
    if args.json:
        report.to_json(results, args.json, meta=meta)
    if args.junit_xml:
        report.to_junit_xml(results, args.junit_xml, allow_conventions=args.allow_conventions)
    if args.markdown:
        report.to_markdown(results, args.markdown, title=title, coverage=coverage)
    if args.html:
        _write_html(args, results, meta)
    return report.exit_code(results, strict_xpass=not args.no_strict_xpass,
                            allow_conventions=args.allow_conventions, allow_empty=args.allow_empty)


def cmd_merge(args: argparse.Namespace) -> int:
    from conformance.merge import merge

    try:
        _check_reports(args)
        meta, results, coverage = merge(args.reports)
    except ValueError as exc:
        return _usage_error("merge", str(exc))
    return _reports(args, results, meta, coverage, sys.stderr if args.json == "-" else sys.stdout)


def cmd_repro(args: argparse.Namespace) -> int:
    import numpy as np

    from conformance import runner, support
    from conformance.adapters import load_adapter

    parts = args.case_id.split(":")
    if len(parts) != 5:
        return _usage_error("repro", f"a case id looks like ADAPTER:OP:DTYPE:CASE:SEED, got {args.case_id!r}")
    adapter_name, op, dtype, name, seed = parts
    try:
        adapter = load_adapter(args.adapter or adapter_name)
        support.validate(adapter)
        planned = runner.find_case(op, name, int(seed), dtype)
    except (ValueError, KeyError, TypeError) as exc:
        return _usage_error("repro", str(exc.args[0] if exc.args else exc))
    trace: list = []
    result = runner.run_case(adapter, planned, profile=args.profile, trace=trace)
    np.set_printoptions(precision=17, threshold=args.max_elements, linewidth=110)
    print(f"case {result.id}: {result.verdict}")
    print(f"hyper-parameters: {result.hparams}")
    print(f"adapter dialect: {result.dialect}")
    for step in trace:
        print(f"\n--- step {step['step']} (training={step['hparams'].get('training', '-')})")
        for key, value in step["arrays"].items():
            print(f"{key} {value.shape}:\n{value}")
        for comp in step["comparisons"]:
            key = comp.quantity
            exp, act = step["expected"][key], np.asarray(step["actual"].get(key), dtype=np.float64)
            print(f"\n{key} [{comp.status}] {comp.describe()}")
            print(f"  oracle (float64):\n{exp}\n  adapter:\n{act}")
            if act.shape == exp.shape:
                print(f"  adapter - oracle:\n{act - exp}")
    print(f"\n{result.verdict}: {result.message}")
    return 0 if result.verdict not in ("FAIL", "ERROR") else 1


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

    p_check = sub.add_parser(
        "check",
        help="check a framework against the oracle",
        description="Run the conformance cases through ADAPTER (a built-in name: numpy32, torch, jax, "
        "pytorch_optimizer; a module path; or a .py file). Without ADAPTER, every installed framework is "
        "checked (numpy32 if none is). Exit status: 0 when every judged case passes; 1 on FAIL, ERROR, "
        "XPASS or CONVENTION; 2 on a usage or configuration error; 3 when nothing was compared.",
    )
    p_check.add_argument("adapter", nargs="?", help="numpy32 | torch | jax | my.module | path/to/adapter.py")
    _selection_options(p_check)
    p_check.add_argument("--timeout", type=_positive(float), default=None,
                         help="seconds per adapter call (default: the profile's, 60 s); after "
                         "3 consecutive timeouts the adapter's remaining cases are ERROR")
    p_check.add_argument("--xfails", help="TOML file of [[xfail]] id (regex) / reason entries")
    _report_options(p_check)
    p_check.add_argument("--shard", help="run only shard K of N (K/N, 1-based); `normref merge` joins "
                         "the shards' JSON reports")
    p_check.add_argument("--jobs", type=_jobs_value, default=None,
                         help="run the cases in N worker processes, or 'auto': one per CPU core "
                         "(the default, or $NORMREF_JOBS); the report is the same as with 1")
    p_check.add_argument("--oracle-device", choices=("cpu", "cuda"), default=None, dest="oracle_device",
                         help="where the float64 oracle computes: cpu (NumPy) or cuda (CuPy on the current "
                         "GPU); default: $NORMREF_BACKEND (numpy|cupy), else cpu")
    p_check.add_argument("--traceback", action="store_true",
                         help="on an adapter that fails to load, print the whole traceback")
    p_check.set_defaults(func=cmd_check)

    p_merge = sub.add_parser(
        "merge", help="join the JSON reports of --shard runs into one",
        description="Join the JSON reports of `normref check --shard K/N --json ...` runs (or whole runs of "
        "different adapters) into one report, with the exit status one run would have. Parts of "
        "different normref versions, seeds, profiles, dtypes or --ops, missing or repeated shards are "
        "refused (exit 2).")
    p_merge.add_argument("reports", nargs="+", help="JSON reports written by normref check --json")
    _report_options(p_merge)
    p_merge.set_defaults(func=cmd_merge)

    p_repro = sub.add_parser("repro", help="rerun one case and print everything",
                             description="Rerun one case by its id and print inputs, both results and "
                             "their difference at every step.")
    p_repro.add_argument("case_id", help="ADAPTER:OP:DTYPE:CASE:SEED as printed by `normref check`")
    p_repro.add_argument("--adapter", help="load this adapter instead of the id's (e.g. a .py path)")
    p_repro.add_argument("--profile", choices=sorted(runner_profiles()), default="default")
    p_repro.add_argument("--max-elements", type=int, default=200, dest="max_elements",
                         help="print arrays in full up to this size")
    p_repro.set_defaults(func=cmd_repro)

    p_export = sub.add_parser(
        "export", help="write golden vectors for a backend without Python",
        description="Write every case a backend would be asked for into DIR (which must not exist or be "
        "empty): per case a JSON manifest (op, hyper-parameters per step, what is given, what to return) and "
        "its arrays (inputs, state, cotangents, each step's gradients or batch, the oracle's expected values "
        "and bounds), plus index.json, cases.tsv and a README.md saying what to compute and write back for "
        "`normref judge`. The backend's conventions, dtypes and options come from --adapter (a Python "
        "adapter's declaration; its evaluate is never called) or --declare (a JSON file), else every op in "
        "every dtype with the spec's default conventions. Exit status: 0 written; 2 usage error; 3 nothing "
        "to export.")
    p_export.add_argument("dir", help="the directory to write (created; must be empty if it exists)")
    declared = p_export.add_mutually_exclusive_group()
    declared.add_argument("--adapter", help="export for what this adapter declares (numpy32 | torch | jax | "
                          "my.module | path/to/adapter.py)")
    declared.add_argument("--declare", help='a JSON declaration: {"name": ..., "info": {...}, "ops": {op or '
                          '"*": {"dtypes": [...], "dialect": {...}, "gradients": true, "hparam_dtype": ..., '
                          '"not_kept": [...], "state_dtype": ..., "takes_draws": true}}}')
    _selection_options(p_export)
    p_export.add_argument("--layout", choices=["npz", "npy-dir"], default="npz",
                          help="one .npz per case (default), or a folder of .npy files per case (and "
                          "hparams.tsv per step), which C reads without a library")
    p_export.add_argument("--no-expected", action="store_false", dest="expected",
                          help="leave out the oracle's expected values and bounds (float64 arrays for "
                          "every returned quantity: most of an export's size)")
    p_export.add_argument("--jobs", type=_jobs_value, default=None,
                          help="export in N worker processes, or 'auto' (the default, or $NORMREF_JOBS)")
    p_export.add_argument("--traceback", action="store_true",
                          help="on an adapter that fails to load, print the whole traceback")
    p_export.set_defaults(func=cmd_export)

    p_judge = sub.add_parser(
        "judge", help="judge a backend's results on exported golden vectors",
        description="Judge the results a backend wrote into RESULTS for the golden vectors of DIR (`normref "
        "export`): the verdicts, bounds, diagnoses, reports and exit status are those `normref check` gives "
        "an adapter returning the same arrays (the check machinery runs with an adapter answering from "
        "RESULTS, which also verifies each request is the exported one). A case without a result is ERROR "
        "(no result). Exit status: 0 when every judged case passes; 1 on FAIL, ERROR, XPASS or CONVENTION; 2 "
        "on a usage error (DIR not an export of this normref, RESULTS not a directory, a report path not "
        "writable); 3 when nothing was compared.")
    p_judge.add_argument("dir", help="the directory written by normref export")
    p_judge.add_argument("results", help="the directory of the backend's results (see DIR/README.md)")
    p_judge.add_argument("--xfails", help="TOML file of [[xfail]] id (regex) / reason entries")
    p_judge.add_argument("--timeout", type=_positive(float), default=None,
                         help="seconds per request (default: the profile's)")
    p_judge.add_argument("--jobs", type=_jobs_value, default=None,
                         help="judge in N worker processes, or 'auto' (the default, or $NORMREF_JOBS)")
    _report_options(p_judge)
    p_judge.set_defaults(func=cmd_judge)
    return parser


def _selection_options(parser: argparse.ArgumentParser) -> None:
    """Which cases: the options check and export share."""
    parser.add_argument("--ops", default=None, help="regex over op names or <family>/<op> (default: all)")
    parser.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES),
                        help="comma-separated subset of float64,float32,float16,bfloat16 (default: all "
                        "four; each adapter runs the ones it declares)")
    parser.add_argument("--seed", type=_non_negative(int), default=0,
                        help="case seed (same seed, same cases)")
    parser.add_argument("--max-examples", type=_non_negative(int), default=None, dest="max_examples",
                        help="seeded random cases per op (overrides the profile's count)")
    parser.add_argument("--profile", choices=sorted(runner_profiles()), default="default")


DEFAULT_DTYPES = ("float64", "float32", "float16", "bfloat16")


def _non_negative(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    return parse


def _jobs_value(text: str) -> int | str:
    """``--jobs``: a positive int or ``auto``."""
    return "auto" if text == "auto" else _positive(int)(text)


def _workers(jobs: int | str | None, planned: list[Any]) -> int:
    """Worker processes for a run: ``--jobs``, else ``$NORMREF_JOBS``, else ``auto`` (one per CPU
    core, never more than the runs of one op and dtype that can go to separate workers)."""
    if jobs is None:
        env = os.environ.get("NORMREF_JOBS", "auto")
        try:
            jobs = _jobs_value(env)
        except argparse.ArgumentTypeError:
            raise ValueError(f"NORMREF_JOBS must be a positive int or 'auto', got {env!r}") from None
    if jobs != "auto":
        return int(jobs)
    from conformance.parallel import chunks

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, len(chunks(planned))))


def _report_options(parser: argparse.ArgumentParser) -> None:
    """The options check and merge share: what fails the run, and the report files."""
    parser.add_argument("--no-strict-xpass", action="store_true", dest="no_strict_xpass",
                        help="do not fail the run on XPASS")
    parser.add_argument("--allow-conventions", action="store_true", dest="allow_conventions",
                        help="do not fail the run on CONVENTION (a case matching another convention than "
                        "the declared one)")
    parser.add_argument("--allow-empty", action="store_true", dest="allow_empty",
                        help="exit 0 when nothing was compared (default: exit 3)")
    parser.add_argument("--json", help="write one JSON record per case to this file ('-': stdout, "
                        "the terminal report then goes to stderr)")
    parser.add_argument("--junit-xml", dest="junit_xml", help="write JUnit XML to this file")
    parser.add_argument("--markdown", help="write a Markdown summary (for a PR comment) to this file")
    parser.add_argument("--html", help="write an HTML report (from the same document as --json) to this file")


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = _non_negative(kind)(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def runner_profiles() -> list[str]:
    # Kept in sync with conformance.runner.PROFILES without importing NumPy-heavy modules for --help.
    return ["quick", "default", "thorough"]


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"normref {version('normref')}"
    except Exception:  # pragma: no cover - running from a source tree without metadata
        return "normref (source tree)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # `normref show X --json | head`: the reader left; say nothing more and exit quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("normref: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
