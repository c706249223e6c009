"""pytest plugin: latency regression tests on a device (`latency_regression` fixture).

Installed with deeplsp (entry point `pytest11`), so a project's tests can write

    def test_latency(latency_regression):
        latency_regression("tests/regression/suite.toml")

and run them on this machine's CPU, or on a Jetson through its agent with
`pytest --device-url http://orin:8765` (or $DEEPLSP_DEVICE_URL). The device is the
one the agent serves unless `--deeplsp-device` names it. A device with no recorded
baseline skips, saying how to record one (`--update-latency-baseline`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("deeplsp", "DeepLSP latency regression tests")
    g.addoption(
        "--device-url",
        default=None,
        metavar="URL",
        help="run latency regression suites through the DeepLSP agent at URL "
        "(default: $DEEPLSP_DEVICE_URL; else this machine)",
    )
    g.addoption(
        "--deeplsp-device",
        default=None,
        metavar="NAME",
        help="device of the latency suites (default: the agent's device, else cpu)",
    )
    g.addoption(
        "--update-latency-baseline",
        action="store_true",
        help="record latency baselines instead of comparing with them",
    )


@pytest.fixture(scope="session")
def deeplsp_device(request: pytest.FixtureRequest):
    """The device latency suites run on (resolved once per session)."""
    from devices.config import ENV_URL, resolve_device
    from profiling.target import served_device

    url = request.config.getoption("--device-url") or os.environ.get(ENV_URL)
    name = request.config.getoption("--deeplsp-device")
    if name is None:
        name = served_device(url) if url else "cpu"
    return resolve_device(name, url)


@pytest.fixture
def latency_regression(request: pytest.FixtureRequest, deeplsp_device) -> Callable[..., object]:
    """Measure a suite and fail the test on a regression against its baseline."""
    from deeplsp.errors import DeepLSPError
    from deeplsp.regress import default_baseline, run_regress

    update = request.config.getoption("--update-latency-baseline")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def log(msg: str) -> None:
        if reporter is not None:
            reporter.write_line(f"[deeplsp] {msg}")

    def check(suite: str | Path, baseline: str | Path | None = None):
        suite = Path(suite)
        path = Path(baseline) if baseline else default_baseline(suite, deeplsp_device.name)
        if not update and not path.is_file():
            pytest.skip(
                f"no latency baseline {path} for {deeplsp_device.name}: record it on the "
                "device with --update-latency-baseline (or `deeplsp regress --update`)"
            )
        try:
            report = run_regress(suite, deeplsp_device, path, update=update, log=log)
        except DeepLSPError as exc:
            pytest.fail(f"latency suite {suite}: {exc}", pytrace=False)
        log("\n" + report.table())
        if report.regressed:
            names = ", ".join(v.name for v in report.regressed)
            pytest.fail(
                f"latency regression on {deeplsp_device.name} (tolerance "
                f"{report.tolerance:.0%}): {names}\n{report.table()}",
                pytrace=False,
            )
        return report

    return check
