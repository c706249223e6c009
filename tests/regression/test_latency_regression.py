"""DeepLSP's own latency regression suite (tests/regression/suite.toml) on the device
given to pytest: this machine's CPU by default, a Jetson with --device-url."""

from pathlib import Path

import pytest

SUITE = Path(__file__).parent / "suite.toml"


@pytest.mark.slow
def test_delivered_networks_keep_their_latency(latency_regression):
    report = latency_regression(SUITE)
    # the suite's networks are smaller than its reference: a ratio >= 1 would mean the
    # channels were not removed for real
    ratios = {v.name: v.ratio for v in report.verdicts}
    assert all(r < 1 for name, r in ratios.items() if name != report.result.reference)
