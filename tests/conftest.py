"""Test configuration: hypothesis profiles.

``ci`` (the default) is fast and derandomized so CI is reproducible; ``thorough`` is for local runs:
``HYPOTHESIS_PROFILE=thorough pytest``.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=20,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# `normref check` runs in one worker process per core by default; the tests call it in process
# (some with monkeypatched harness functions, which spawned workers would not see) and under
# pytest-xdist already use every core: one process, unless a test asks for --jobs.
os.environ.setdefault("NORMREF_JOBS", "1")


@pytest.fixture(autouse=True)
def _fresh_memo_when_patched(request):
    """A test that monkeypatches the harness's computations must not be served values kept from
    before the patch (conformance/memo.py), nor leave values computed under the patch behind."""
    if "monkeypatch" not in request.fixturenames:
        yield
        return
    from conformance import memo

    memo.clear()
    yield
    memo.clear()
