"""The CI gate for teams whose CI is pytest: every conformance case becomes a test item.

    pytest -p conformance.pytest_plugin --normref-adapter=torch [--normref-ops REGEX]
           [--normref-dtypes float64,float32] [--normref-profile quick|default|thorough]
           [--normref-seed N] [--normref-xfails FILE]

Items are named by case id (``torch:batch_norm:float32:nchw_train:0``), so ``-k batch_norm`` and
``--deselect`` work as usual.  PASS and MISTRUSTED pass (the latter adds a report section saying
why); CONVENTION fails as in ``normref check`` unless ``--normref-allow-conventions``; FAIL and
ERROR fail with the measured error, bound, diagnosis and the
``normref repro`` line; SKIP skips; XFAIL/XPASS follow the xfails file.  Without
``--normref-adapter`` the plugin adds nothing.
"""

from __future__ import annotations

from typing import Any

import pytest

from conformance import report, runner, xfails
from conformance.adapters import load_adapter


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("normref", "normref conformance cases")
    group.addoption("--normref-adapter", default=None, help="numpy32 | torch | jax | module | file.py")
    group.addoption("--normref-ops", default=None, help="regex over op names")
    group.addoption("--normref-dtypes", default="float64,float32,float16,bfloat16",
                    help="comma-separated dtypes (each adapter runs the ones it declares)")
    group.addoption("--normref-profile", default="default", choices=sorted(runner.PROFILES))
    group.addoption("--normref-seed", type=int, default=0)
    group.addoption("--normref-xfails", default=None, help="TOML file of [[xfail]] id/reason entries")
    group.addoption("--normref-allow-conventions", action="store_true", default=False,
                    help="let CONVENTION cases pass (default: they fail, as in `normref check`)")


class NormrefFailure(Exception):
    """A conformance case that FAILed or ERRORed."""


class NormrefItem(pytest.Item):
    def __init__(self, *, adapter: Any, planned: runner.PlannedCase, profile: str,
                 xfails: Any, allow_conventions: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.adapter, self.planned, self.profile, self.xfails = adapter, planned, profile, xfails
        self.allow_conventions = allow_conventions

    def runtest(self) -> None:
        (result,) = runner.run(self.adapter, [self.planned], profile=self.profile, xfails=self.xfails)
        detail = "\n".join(report._detail(result))
        if result.verdict == "SKIP":
            pytest.skip(result.message)
        if result.verdict == "XFAIL":
            pytest.xfail(result.message)
        failing = ("FAIL", "ERROR", "XPASS") + (() if self.allow_conventions else ("CONVENTION",))
        if result.verdict in failing:
            raise NormrefFailure(detail)
        if result.verdict in ("CONVENTION", "MISTRUSTED"):
            self.add_report_section("call", "normref", detail)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, NormrefFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[str, int | None, str]:
        return "normref", None, self.name


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    spec = config.getoption("normref_adapter")
    if not spec:
        return
    adapter = load_adapter(spec)
    dtypes = [d.strip() for d in config.getoption("normref_dtypes").split(",") if d.strip()]
    profile = config.getoption("normref_profile")
    planned = runner.plan(adapter, ops=config.getoption("normref_ops"), dtypes=dtypes,
                          seed=config.getoption("normref_seed"), profile=profile)
    expected = xfails.load(config.getoption("normref_xfails"))
    allow = config.getoption("normref_allow_conventions")
    for case in planned:
        items.append(NormrefItem.from_parent(session, name=case.id(adapter.name), adapter=adapter,
                                             planned=case, profile=profile, xfails=expected,
                                             allow_conventions=allow))
