"""Timing a file against a reference: the ratio survives a machine whose speed drifts."""

from __future__ import annotations

import pytest

from deeplsp.errors import DeepLSPError
from devices import DEVICES
from profiling import target
from profiling.runner import LatencyStats

TRUE_MS = {"ref.onnx": 8.0, "small.onnx": 2.0}


class DriftingClock:
    """Each timing window is `drift` times slower than the one before it."""

    def __init__(self, drift: float, spikes: dict[int, float] | None = None) -> None:
        self.drift, self.spikes, self.order = drift, spikes or {}, []

    def __call__(self, device, paths, warmup, iters, repeats=1):
        for path in paths:
            k = len(self.order)
            self.order.append(str(path))
            ms = TRUE_MS[str(path)] * self.drift**k * self.spikes.get(k, 1.0)
            yield LatencyStats.from_samples([ms] * iters, warmup)


@pytest.fixture
def cpu():
    return DEVICES.get("cpu")


def test_a_steady_drift_cancels_out_of_every_ratio(monkeypatch, cpu):
    clock = DriftingClock(1.05)  # 5% slower every window: 2x slower over the call
    monkeypatch.setattr(target, "measure_many", clock)
    rel = target.measure_relative(cpu, "small.onnx", "ref.onnx", 1, 5, rounds=7)
    assert clock.order == ["ref.onnx", "small.onnx"] * 7 + ["ref.onnx"]
    assert rel.ratio == pytest.approx(0.25)
    assert rel.ratios == pytest.approx([0.25] * 7)
    # As timed, the file's middle window is far from its true 2 ms; the ratio is not.
    assert rel.stats.median > 2.0 * 1.05**5


def test_one_slow_window_moves_one_ratio_not_the_median(monkeypatch, cpu):
    monkeypatch.setattr(target, "measure_many", DriftingClock(1.0, spikes={3: 1.6}))
    rel = target.measure_relative(cpu, "small.onnx", "ref.onnx", 1, 5, rounds=5)
    assert max(rel.ratios) == pytest.approx(0.25 * 1.6)
    assert rel.ratio == pytest.approx(0.25)


def test_rounds_must_be_positive(cpu):
    with pytest.raises(DeepLSPError, match="rounds must be >= 1"):
        target.measure_relative(cpu, "small.onnx", "ref.onnx", 1, 5, rounds=0)


def test_scaled_stats_keep_their_shape():
    stats = LatencyStats.from_samples([1.0, 2.0, 3.0, 4.0], warmup=2)
    half = stats.scaled(0.5)
    assert (half.median, half.p90, half.min, half.mean) == pytest.approx(
        (stats.median / 2, stats.p90 / 2, stats.min / 2, stats.mean / 2)
    )
    assert (half.n, half.warmup) == (stats.n, stats.warmup)


def test_only_onnx_runtime_has_kernel_times():
    gpu = DEVICES.get("gpu")
    with pytest.raises(DeepLSPError, match="runs tensorrt: no kernel times"):
        next(target.measure_many(gpu, ["layer.onnx"], 1, 1, kernels_except=("ReorderInput",)))
    assert target.layer_timing(gpu) == "file"
