"""The device's cache knee: the chain files, their timing and storage, and the hinge fit.
The device clock is a function of each chain file's weights (tests never time)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from deeplsp.errors import DeepLSPError
from devices import get_device
from profiling.counting import count_onnx
from profiling.latency_table import LatencyTable, LayerSig, layer_onnx
from profiling.runner import LatencyStats
from profiling.weight_spill import MIN_STEP, fit_knee, free_weights

SMALL = LayerSig("conv", 8, 8, kernel=3, padding=1, in_hw=4, act="relu")  # 584 weights
W = SMALL.weights


def _stats(ms: float) -> LatencyStats:
    return LatencyStats.from_samples([ms] * 5, warmup=0)


def _hinge(free: float, per_layer=0.1, per_weight=5e-5, lengths=range(1, 13)):
    return [(k, k * W, 0.02 + per_layer * k + per_weight * max(0, k * W - free)) for k in lengths]


# -- fit_knee ---------------------------------------------------------------------


@pytest.mark.parametrize("free", [2.5 * W, 3.3 * W, 8.0 * W])
def test_fit_knee_recovers_the_hinge(free):
    rng = np.random.default_rng(0)
    chain = [(k, w, ms * (1 + 0.002 * rng.standard_normal())) for k, w, ms in _hinge(free)]
    knee = fit_knee(chain)
    assert knee.free == pytest.approx(free, abs=0.2 * W)
    assert knee.per_weight_ms == pytest.approx(5e-5, rel=0.1)
    assert knee.per_layer_ms == pytest.approx(0.1, rel=0.05)
    assert knee.to_dict()["per_million_weights_ms"] == pytest.approx(50, rel=0.1)


def test_fit_knee_finds_none_in_a_straight_line_or_a_small_step():
    assert fit_knee(_hinge(0.0)).free is None  # every weight spilled: a line
    assert fit_knee(_hinge(1e9)).free is None  # none spilled within the chain
    small = 0.5 * MIN_STEP * 0.1 / W  # the step per layer is half the least that counts
    knee = fit_knee(_hinge(4 * W, per_weight=small))
    assert knee.free is None and knee.per_weight_ms == 0.0
    with pytest.raises(ValueError, match="at least 5 chain lengths"):
        fit_knee(_hinge(2 * W, lengths=(1, 2, 3, 4)))


def test_one_slow_longest_chain_is_not_a_knee():
    """Session 22: a chain flat within 2% but for its longest length, 5% slow, read as a
    knee in one probe of a host and not in the next."""
    chain = _hinge(1e9, lengths=range(1, 17))
    chain[-1] = (*chain[-1][:2], chain[-1][2] * 1.05)
    assert fit_knee(chain).free is None
    # a knee with three lengths past it is found
    assert fit_knee(_hinge(13 * W, lengths=range(1, 17))).free == pytest.approx(13 * W, abs=W)


# -- the chain files ----------------------------------------------------------------


def test_a_repeated_layer_is_a_chain_of_copies_with_their_own_weights():
    data = layer_onnx(SMALL, repeat=3)
    model = onnx.load_from_string(data)
    w = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    assert {"weight", "weight1", "weight2"} <= set(w)
    assert not torch.equal(w["weight"], w["weight1"])
    assert count_onnx_bytes(data) == 3 * W
    x = np.random.default_rng(2).standard_normal((1, 8, 4, 4)).astype(np.float32)
    out = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x})
    ref = torch.from_numpy(x)
    for n in ("", "1", "2"):
        ref = F.relu(F.conv2d(ref, w[f"weight{n}"], w[f"bias{n}"], padding=1))
    np.testing.assert_allclose(out[0], ref.mean((2, 3), keepdim=True).numpy(), rtol=1e-4, atol=1e-5)
    assert layer_onnx(SMALL, repeat=1) == layer_onnx(SMALL)  # one copy: the table's own file


def count_onnx_bytes(data: bytes) -> int:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        path.write_bytes(data)
        return count_onnx(path).params


@pytest.mark.parametrize(
    "sig",
    [
        LayerSig("conv", 8, 16, kernel=3, padding=1, in_hw=4),  # outputs differ from inputs
        LayerSig("conv", 8, 8, kernel=3, stride=2, padding=1, in_hw=4),  # a smaller map
        LayerSig("linear", 8, 8),
    ],
)
def test_only_a_shape_keeping_convolution_repeats(sig):
    with pytest.raises(DeepLSPError, match="can be repeated"):
        layer_onnx(sig, repeat=2)
    with pytest.raises(DeepLSPError, match="repeat must be >= 1"):
        layer_onnx(SMALL, repeat=0)


# -- free_weights: timed through the table, stored with it ---------------------------


def test_free_weights_times_each_chain_once_per_device_and_finds_the_knee(tmp_path):
    timed = []

    def clock(path):  # a device whose cache holds 4.5 layers' weights
        timed.append(path)
        return _stats(
            0.02
            + 0.1 * count_onnx(path).params / W
            + 5e-5 * max(0, count_onnx(path).params - 4.5 * W)
        )

    lengths = (1, 2, 3, 4, 5, 6, 8, 10)
    path = tmp_path / "t.sqlite"
    with LatencyTable(get_device("cpu"), path, measure_network=clock) as table:
        knee = free_weights(table, probe=SMALL, lengths=lengths)
        assert len(timed) == 3 * len(lengths)  # three rounds
        assert table.stats["rows"] == 0  # networks, not layers
        stored = table._query("SELECT COUNT(*) FROM latency", ())[0][0]
        assert stored == len(lengths)
    assert knee.free == pytest.approx(4.5 * W, abs=0.2 * W)
    assert [c[0] for c in knee.chain] == list(lengths)
    with LatencyTable(get_device("cpu"), path, measure_network=clock) as table:
        assert free_weights(table, probe=SMALL, lengths=lengths) == knee
    assert len(timed) == 3 * len(lengths)  # the second run measured nothing


def test_a_network_is_the_median_of_its_rounds_and_cannot_pass_for_a_layer(tmp_path):
    readings = iter([3.0, 1.0, 2.0])
    with LatencyTable(
        get_device("cpu"), tmp_path / "t.sqlite", measure_network=lambda p: _stats(next(readings))
    ) as table:
        assert table.networks({"probe/x1": lambda: layer_onnx(SMALL)}) == {"probe/x1": 2.0}
        with pytest.raises(DeepLSPError, match="cannot start like a layer key"):
            table.networks({SMALL.key(): lambda: layer_onnx(SMALL)})
