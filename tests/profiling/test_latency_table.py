import dataclasses
import json
import math
import sqlite3

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from deeplsp.errors import DeepLSPError
from devices import get_device
from profiling.latency_table import (
    ACTIVATIONS,
    HARNESS,
    Calibration,
    LatencyTable,
    LayerSig,
    activation_after,
    fit_weight_cost,
    layer_onnx,
)
from profiling.runner import LatencyStats

CONV = LayerSig("conv", 64, 128, (3, 3), (1, 1), (1, 1), 1, (32, 32), 1)


class FakeMeasure:
    """Counts calls; latency grows with channels so each sig gets its own value."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls: list[LayerSig] = []
        self.fail_on_call = fail_on_call

    def __call__(self, sig: LayerSig) -> LatencyStats:
        self.calls.append(sig)
        if len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt
        ms = 0.001 * sig.in_channels * sig.out_channels
        return LatencyStats.from_samples([ms, ms, ms * 1.5], warmup=0)


@pytest.fixture
def cpu():
    return get_device("cpu")


def _run(sig: LayerSig, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    data = layer_onnx(sig)
    weights = {
        t.name: numpy_helper.to_array(t).copy()
        for t in onnx.load_from_string(data).graph.initializer
    }
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(["output"], {"input": x})[0], weights


# -- LayerSig -------------------------------------------------------------------


def test_key_is_stable_and_normalised():
    assert CONV.key() == "conv/i64/o128/k3x3/s1x1/p1x1/g1/hw32x32/b1"
    assert LayerSig("conv", 64, 128, 3, 1, 1, 1, [32, 32]) == CONV  # ints and lists normalised
    assert hash(LayerSig("conv", 64, 128, 3, 1, 1, 1, (32, 32))) == hash(CONV)
    assert LayerSig("linear", 512, 10, batch=4).key() == "linear/i512/o10/b4"


def test_key_differs_for_every_field():
    variants = [
        CONV,
        dataclasses.replace(CONV, kind="linear", kernel=1, padding=0, in_hw=1),
        dataclasses.replace(CONV, in_channels=32),
        dataclasses.replace(CONV, out_channels=64),
        dataclasses.replace(CONV, kernel=(3, 1)),
        dataclasses.replace(CONV, kernel=(1, 3)),
        dataclasses.replace(CONV, stride=(2, 2)),
        dataclasses.replace(CONV, stride=(1, 2)),
        dataclasses.replace(CONV, padding=(0, 0)),
        dataclasses.replace(CONV, padding=(1, 0)),
        dataclasses.replace(CONV, groups=2),
        dataclasses.replace(CONV, in_hw=(16, 16)),
        dataclasses.replace(CONV, in_hw=(32, 16)),
        dataclasses.replace(CONV, batch=8),
    ]
    keys = [v.key() for v in variants]
    assert len(set(keys)) == len(keys), keys


def test_with_channels_keeps_depthwise_depthwise():
    dw = LayerSig("conv", 96, 96, 3, 1, 1, groups=96, in_hw=(16, 16))
    assert dw.with_channels(40, 40).groups == 40
    assert dw.with_channels(40, 40).key() == "conv/i40/o40/k3x3/s1x1/p1x1/g40/hw16x16/b1"
    dense = CONV.with_channels(16, 24)
    assert (dense.in_channels, dense.out_channels, dense.groups) == (16, 24, 1)
    assert dense.kernel == CONV.kernel and dense.in_hw == CONV.in_hw
    grouped = dataclasses.replace(CONV, groups=4).with_channels(32, 48)
    assert grouped.groups == 4


def test_from_module_conv_depthwise_linear():
    conv = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
    assert LayerSig.from_module(conv, (2, 3, 32, 30)) == LayerSig(
        "conv", 3, 16, (3, 3), (2, 2), (1, 1), 1, (32, 30), 2
    )
    dw = nn.Conv2d(24, 24, (5, 3), padding=(2, 1), groups=24)
    sig = LayerSig.from_module(dw, (1, 24, 8, 8))
    assert sig.groups == 24 and sig.is_depthwise and sig.kernel == (5, 3) and sig.padding == (2, 1)
    same = nn.Conv2d(8, 8, 3, padding="same")
    assert LayerSig.from_module(same, (1, 8, 8, 8)).padding == (1, 1)
    fc = nn.Linear(512, 10)
    assert LayerSig.from_module(fc, (4, 512)) == LayerSig("linear", 512, 10, batch=4)


def test_from_module_rejects_other_modules_and_bad_shapes():
    with pytest.raises(DeepLSPError, match="Conv2d and nn.Linear"):
        LayerSig.from_module(nn.ReLU(), (1, 3, 8, 8))
    with pytest.raises(DeepLSPError, match="channels"):
        LayerSig.from_module(nn.Conv2d(3, 8, 3), (1, 4, 8, 8))
    with pytest.raises(DeepLSPError, match="N, C, H, W"):
        LayerSig.from_module(nn.Conv2d(3, 8, 3), (3, 8, 8))
    with pytest.raises(DeepLSPError, match="dilated"):
        LayerSig.from_module(nn.Conv2d(3, 8, 3, dilation=2), (1, 3, 8, 8))
    with pytest.raises(DeepLSPError, match="Linear input"):
        LayerSig.from_module(nn.Linear(8, 2), (1, 9))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_channels": 0},
        {"out_channels": -1},
        {"groups": 3},  # 64 and 128 not divisible by 3
        {"kernel": (0, 3)},
        {"stride": 0},
        {"padding": -1},
        {"in_hw": (2, 2), "padding": 0},  # 3x3 kernel on 2x2 input: empty output
        {"batch": 0},
        {"kind": "pool"},
        {"kernel": "ab"},
    ],
)
def test_invalid_signatures_are_rejected(kwargs):
    with pytest.raises(DeepLSPError):
        layer_onnx(dataclasses.replace(CONV, **kwargs))


def test_linear_rejects_spatial_fields():
    with pytest.raises(DeepLSPError, match="linear layer has no in_hw"):
        LayerSig("linear", 8, 4, in_hw=(2, 2))


# -- layer_onnx -----------------------------------------------------------------


@pytest.mark.parametrize(
    "sig",
    [
        LayerSig("conv", 8, 12, (3, 3), (2, 1), (1, 0), 1, (9, 7), 2),
        LayerSig("conv", 16, 16, (3, 3), (1, 1), (1, 1), 16, (6, 6), 1),  # depthwise
        LayerSig("conv", 8, 12, (1, 1), (1, 1), (0, 0), 4, (5, 5), 1),  # grouped pointwise
    ],
)
def test_layer_onnx_conv_matches_torch(sig):
    x = np.random.default_rng(1).standard_normal((sig.batch, sig.in_channels, *sig.in_hw))
    out, w = _run(sig, x.astype(np.float32))
    ref = F.conv2d(
        torch.from_numpy(x.astype(np.float32)),
        torch.from_numpy(w["weight"]),
        torch.from_numpy(w["bias"]),
        stride=sig.stride,
        padding=sig.padding,
        groups=sig.groups,
    )
    assert tuple(ref.shape) == (sig.batch, sig.out_channels, *sig.out_hw)
    # the file ends in its sink, a global average pool
    assert out.shape == (sig.batch, sig.out_channels, 1, 1)
    np.testing.assert_allclose(out, ref.mean((2, 3), keepdim=True).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("module", list(ACTIVATIONS))
def test_layer_onnx_applies_the_activation_as_torch_does(module):
    act = ACTIVATIONS[module]
    conv = LayerSig("conv", 4, 6, (3, 3), (1, 1), (1, 1), 1, (5, 5), 1, act=act)
    x = np.random.default_rng(3).standard_normal((1, 4, 5, 5)).astype(np.float32) * 4
    out, w = _run(conv, x)
    weight, bias = torch.from_numpy(w["weight"]), torch.from_numpy(w["bias"])
    ref = module()(F.conv2d(torch.from_numpy(x), weight, bias, padding=1))
    ref = ref.mean((2, 3), keepdim=True)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-4)
    linear = LayerSig("linear", 8, 3, batch=2, act=act)
    x = np.random.default_rng(4).standard_normal((2, 8)).astype(np.float32) * 4
    out, w = _run(linear, x)
    weight, bias = torch.from_numpy(w["weight"]), torch.from_numpy(w["bias"])
    ref = module()(F.linear(torch.from_numpy(x), weight, bias))
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-4)
    assert conv.key().endswith(f"/{act}") and linear.key().endswith(f"/{act}")


def test_an_unknown_activation_is_rejected():
    with pytest.raises(DeepLSPError, match="activation must be one of relu"):
        dataclasses.replace(CONV, act="gelu")


def test_activation_after_skips_batch_norm_and_dropout():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.Hardswish(),
        nn.Conv2d(4, 4, 1),
        nn.Conv2d(4, 4, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.Dropout(),
        nn.Sigmoid(),
        nn.Linear(5, 2),
    )
    calls = []
    for name, m in model.named_modules():
        if name:
            m.register_forward_hook(lambda m, i, o, name=name: calls.append((name, m)))
    model.eval()(torch.zeros(1, 1, 8, 8))
    acts = {n: activation_after(calls, n) for n in ("0", "3", "4", "7", "10")}
    # "3" is followed by another convolution: nothing fuses into it
    assert acts == {"0": "hardswish", "3": "", "4": "relu", "7": "sigmoid", "10": ""}
    with pytest.raises(DeepLSPError, match="'9.9' was not called"):
        activation_after(calls, "9.9")


def test_layer_onnx_linear_matches_torch():
    sig = LayerSig("linear", 20, 7, batch=3)
    x = np.random.default_rng(2).standard_normal((3, 20)).astype(np.float32)
    out, w = _run(sig, x)
    ref = F.linear(torch.from_numpy(x), torch.from_numpy(w["weight"]), torch.from_numpy(w["bias"]))
    assert out.shape == (3, 7)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-4)


def test_layer_onnx_is_seeded_and_declares_opset_18():
    model = onnx.load_from_string(layer_onnx(CONV))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    assert [n.op_type for n in model.graph.node] == ["Conv", "GlobalAveragePool"]
    assert "GlobalAveragePool" in HARNESS
    assert layer_onnx(CONV) == layer_onnx(CONV)
    assert layer_onnx(CONV, seed=1) != layer_onnx(CONV)


# -- LatencyTable ---------------------------------------------------------------


def test_get_measures_once_then_hits(tmp_path, cpu):
    fake = FakeMeasure()
    with LatencyTable(cpu, tmp_path / "c" / "lat.sqlite", measure=fake) as table:
        first = table.get(CONV)
        second = table.get(CONV)
        assert first == second == pytest.approx(0.001 * 64 * 128)
        assert fake.calls == [CONV]
        stats = table.stats
    assert (stats["hits"], stats["misses"], stats["rows"]) == (1, 1, 1)
    assert stats["path"] == str(tmp_path / "c" / "lat.sqlite")


def test_rows_are_keyed_by_the_layer_files_and_how_they_are_timed(tmp_path, cpu):
    from profiling import target

    with LatencyTable(cpu, tmp_path / "t.sqlite", measure=FakeMeasure()) as table:
        assert table.fingerprint == f"{target.fingerprint(cpu)['id']}/layers-2/kernels"
    assert target.layer_timing(cpu) == "kernels"
    assert target.layer_timing(dataclasses.replace(cpu, url="http://127.0.0.1:1")) == "kernels"
    assert target.layer_timing(get_device("jetson-orin")) == "file"


def test_rows_are_reused_across_tables_only_for_the_same_fingerprint(tmp_path, cpu):
    path = tmp_path / "lat.sqlite"
    fake = FakeMeasure()
    with LatencyTable(cpu, path, measure=fake) as table:
        value = table.get(CONV)
    with LatencyTable(cpu, path, measure=fake) as again:
        assert again.get(CONV) == value
        assert again.stats["hits"] == 1 and again.stats["misses"] == 0
    assert len(fake.calls) == 1
    other = dataclasses.replace(cpu, threads=97)
    with LatencyTable(other, path, measure=fake) as table:
        assert table.stats["rows"] == 0
        table.get(CONV)
        assert table.fingerprint != again.fingerprint
    assert len(fake.calls) == 2
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM latency").fetchone()[0] == 2
        assert conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0] == 2
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        info = json.loads(conn.execute("SELECT info FROM devices LIMIT 1").fetchone()[0])
    assert info["device"] == "cpu"


def test_get_many_deduplicates_and_measures_only_missing(tmp_path, cpu):
    fake = FakeMeasure()
    a, b, c = CONV, CONV.with_channels(64, 64), CONV.with_channels(32, 64)
    with LatencyTable(cpu, tmp_path / "lat.sqlite", measure=fake) as table:
        table.get(a)
        result = table.get_many([a, b, b, c, LayerSig("conv", 64, 64, 3, 1, 1, 1, (32, 32))])
        assert list(result) == [a, b, c]
        assert fake.calls == [a, b, c]
        assert result[c] == pytest.approx(0.001 * 32 * 64)
        assert table.stats["rows"] == 3


def test_interrupted_get_many_keeps_what_it_measured(tmp_path, cpu):
    path = tmp_path / "lat.sqlite"
    sigs = [CONV.with_channels(64, c) for c in (8, 16, 24, 32, 40)]
    with LatencyTable(cpu, path, measure=FakeMeasure(fail_on_call=3)) as table:
        with pytest.raises(KeyboardInterrupt):
            table.get_many(sigs)
    fresh = FakeMeasure()
    with LatencyTable(cpu, path, measure=fresh) as table:
        assert table.stats["rows"] == 2
        table.get_many(sigs)
    assert fresh.calls == sigs[2:]


def test_staircase_varies_output_channels(tmp_path, cpu):
    fake = FakeMeasure()
    with LatencyTable(cpu, tmp_path / "lat.sqlite", measure=fake) as table:
        steps = table.staircase(CONV, [8, 16, 32])
        assert steps == [(c, pytest.approx(0.001 * 64 * c)) for c in (8, 16, 32)]
        assert {s.in_channels for s in fake.calls} == {64}
        dw = LayerSig("conv", 32, 32, 3, 1, 1, 32, (8, 8))
        table.staircase(dw, [8, 16])
        assert [(s.in_channels, s.groups) for s in fake.calls[3:]] == [(8, 8), (16, 16)]


def test_corrupt_cache_is_a_user_error(tmp_path, cpu):
    path = tmp_path / "lat.sqlite"
    path.write_bytes(b"this is not an sqlite database\n" * 200)
    with pytest.raises(DeepLSPError, match=r"lat\.sqlite.*deleted"):
        LatencyTable(cpu, path, measure=FakeMeasure())


def test_cache_with_another_schema_is_a_user_error(tmp_path, cpu):
    path = tmp_path / "lat.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE latency (x TEXT)")
    conn.close()
    with pytest.raises(DeepLSPError, match="columns"):
        LatencyTable(cpu, path, measure=FakeMeasure())


def test_closed_table_and_bad_settings(tmp_path, cpu):
    table = LatencyTable(cpu, tmp_path / "lat.sqlite", measure=FakeMeasure())
    table.close()
    with pytest.raises(DeepLSPError, match="closed"):
        table.get(CONV)
    with pytest.raises(DeepLSPError, match="iters"):
        LatencyTable(cpu, tmp_path / "lat.sqlite", iters=0)


def test_default_cache_path_follows_env(tmp_path, cpu, monkeypatch):
    monkeypatch.setenv("DEEPLSP_CACHE_DIR", str(tmp_path / "cache"))
    with LatencyTable(cpu, measure=FakeMeasure()) as table:
        table.get(CONV)
    assert (tmp_path / "cache" / "latency.sqlite").is_file()


def test_real_measurement_on_cpu_through_onnxruntime(tmp_path, cpu):
    path = tmp_path / "lat.sqlite"
    sig = LayerSig("conv", 16, 32, 3, 1, 1, 1, (8, 8))
    with LatencyTable(cpu, path, warmup=2, iters=5) as table:
        ms = table.get(sig)
        assert ms > 0 and table.stats["rows"] == 1
    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT median_ms, p90_ms, n FROM latency").fetchone()
    conn.close()
    assert row[0] == ms and row[1] >= ms and row[2] == 5


# -- Calibration ----------------------------------------------------------------


def test_calibration_recovers_a_known_line():
    sums = [2.0, 5.0, 9.0, 14.0]
    cal = Calibration.fit(sums, [1.3 * s + 0.7 for s in sums])
    assert cal.scale == pytest.approx(1.3) and cal.offset == pytest.approx(0.7)
    assert cal.points == 4 and cal.max_rel_error == pytest.approx(0.0, abs=1e-12)
    for s in sums:  # the curve goes through every measured model
        assert cal.predict(s) == pytest.approx(1.3 * s + 0.7)


def test_calibration_follows_a_power_law_between_and_beyond_its_points():
    sums = [0.5, 2.0, 8.0]
    cal = Calibration.fit(sums, [0.3 * s**1.4 for s in sums])
    for s in (0.25, 1.0, 3.0, 20.0):  # between points and extrapolated
        assert cal.predict(s) == pytest.approx(0.3 * s**1.4)
    budget = cal.table_budget(0.3 * 5.0**1.4)
    assert budget == pytest.approx(5.0, rel=1e-6)


def test_calibration_curve_never_falls():
    # the middle model measured slower than the dense one (noise): pooled, not followed
    cal = Calibration.fit([1.0, 3.0, 4.0], [0.5, 2.2, 1.8])
    values = [cal.predict(s) for s in (1.0, 2.0, 3.0, 3.5, 4.0, 6.0)]
    assert values == sorted(values)
    assert cal.predict(3.0) == pytest.approx(cal.predict(4.0))
    assert cal.predict(cal.table_budget(1.0)) <= 1.0 + 1e-9


def test_calibration_one_point_and_fallbacks():
    one = Calibration.fit([4.0], [6.0])
    assert (one.scale, one.offset, one.points, one.max_rel_error) == (1.5, 0.0, 1, 0.0)
    falling = Calibration.fit([1.0, 2.0], [4.0, 2.0])  # negative slope: ratio of means
    assert falling.scale == pytest.approx(2.0) and falling.offset == 0.0
    assert falling.max_rel_error == pytest.approx(1.0)  # predicts 4 for a measured 2
    with pytest.raises(DeepLSPError):
        Calibration.fit([], [])
    with pytest.raises(DeepLSPError):
        Calibration.fit([1.0, 2.0], [1.0])
    with pytest.raises(DeepLSPError):
        Calibration.fit([0.0], [1.0])


def test_smooth_calibration_follows_a_bent_power_law_through_its_ends():
    """A device whose log latency is a quadratic in the log table sum: the smooth curve
    recovers it between the points, goes through both ends, and goes on straight (in
    log-log) beyond them; the table budget inverts it."""

    def law(s: float) -> float:
        return 0.3 * s**1.4 * math.exp(0.05 * math.log(s) ** 2)

    sums = [0.5, 1.0, 2.0, 4.0, 8.0]
    cal = Calibration.fit(sums, [law(s) for s in sums], smooth=True)
    for s in (0.5, 0.7, 1.5, 3.0, 6.0, 8.0):
        assert cal.predict(s) == pytest.approx(law(s), rel=1e-9)
    assert cal.table_budget(law(3.0)) == pytest.approx(3.0, rel=1e-6)
    # beyond the ends, the slope of the curve at the end (law's own slope keeps bending)
    slope_hi = 1.4 + 0.1 * math.log(8.0)
    assert cal.predict(16.0) == pytest.approx(law(8.0) * 2**slope_hi, rel=1e-9)
    assert cal.predict(16.0) < law(16.0)
    assert json.loads(json.dumps(cal.to_dict()))["smooth"] is True


def test_smooth_calibration_averages_the_scatter_that_interpolation_chases():
    """Networks scatter about the device's curve (each one's own layers): alternate
    points 8% high and low. Interpolating goes through each and is up to 8% off the
    curve between them; the smooth curve passes between them."""
    sums = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0]
    noise = [1.0, 1.08, 0.92, 1.08, 0.92, 1.08, 1.0]  # the ends on the curve
    measured = [0.3 * s**1.4 * n for s, n in zip(sums, noise, strict=True)]
    smooth = Calibration.fit(sums, measured, smooth=True)
    interpolated = Calibration.fit(sums, measured)
    probe = [0.75, 1.0, 1.25, 1.75, 2.0, 2.5, 3.5, 4.0, 6.0]

    def worst(cal: Calibration) -> float:
        return max(abs(cal.predict(s) / (0.3 * s**1.4) - 1) for s in probe)

    assert worst(smooth) < 0.04 < 0.07 < worst(interpolated)


def test_smooth_calibration_never_falls_and_needs_a_point_between_its_ends():
    # a middle network measured far above the line: the bend is limited, the curve rises
    cal = Calibration.fit([1.0, 2.0, 4.0], [1.0, 3.5, 4.0], smooth=True)
    values = [cal.predict(s) for s in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)]
    assert values == sorted(values) and values[1] == pytest.approx(1.0)
    assert values[5] == pytest.approx(4.0)
    # two points: nothing to bend, the same curve as interpolating
    two = Calibration.fit([1.0, 4.0], [1.0, 3.0], smooth=True)
    assert two.predict(2.0) == pytest.approx(Calibration.fit([1.0, 4.0], [1.0, 3.0]).predict(2.0))


def test_a_scaled_calibration_predicts_every_sum_times_its_factor():
    xs, ys = [0.5, 1.0, 2.0, 4.0], [0.4, 1.1, 2.3, 5.0]
    for smooth in (False, True):
        cal = Calibration.fit(xs, ys, smooth=smooth)
        up = cal.scaled(1.25)
        assert up.smooth == smooth
        for x in (0.3, 0.5, 1.5, 3.0, 6.0):
            assert up.predict(x) == pytest.approx(1.25 * cal.predict(x))


def test_calibration_to_dict_is_json():
    cal = Calibration.fit([2.0, 4.0, 7.0], [3.0, 5.5, 8.0])
    back = json.loads(json.dumps(cal.to_dict()))
    assert back["points"] == 3 and back["scale"] == pytest.approx(cal.scale)
    assert back["fit_points"] == [[2.0, 3.0], [4.0, 5.5], [7.0, 8.0]]


# -- weight cost ----------------------------------------------------------------


def test_layer_weights_count_bias_and_groups():
    assert LayerSig("conv", 16, 32, (3, 3), in_hw=(8, 8)).weights == 32 * (16 * 9 + 1)
    depthwise = LayerSig("conv", 32, 32, (3, 3), groups=32, in_hw=(8, 8))
    assert depthwise.weights == 32 * (9 + 1)
    assert LayerSig("linear", 64, 10).weights == 10 * 65


def _device_clock(table_ms: float, weights: int, cost: float) -> float:
    """A device whose end-to-end latency is a power law of the table sum plus `cost` per
    weight element."""
    return 0.4 * (table_ms + cost * weights) ** 1.3


def test_weight_cost_is_recovered_from_two_networks_off_the_curve():
    true = 0.3 * 4.0 / 2_000_000  # on the fitted grid: 0.3 x dense table sum / weights
    curve = [(4.0, 2_000_000), (2.0, 700_000), (0.5, 100_000)]  # uniform networks
    probes = [(2.2, 300_000), (1.6, 1_500_000)]  # weight-light and weight-heavy
    points = [(t, w, _device_clock(t, w, true)) for t, w in curve + probes]
    cost = fit_weight_cost(points[:3], points[3:])
    assert cost == pytest.approx(true, rel=1e-9)
    # with that cost, the calibration through the curve models predicts the probes
    cal = Calibration.fit([t + cost * w for t, w, _ in points[:3]], [m for *_, m in points[:3]])
    for t, w, ms in points[3:]:
        assert cal.predict(t + cost * w) == pytest.approx(ms, rel=1e-9)


def test_weight_cost_stays_under_its_cap_and_reaches_it():
    """The cap (the device chain's cost per spilled weight) bounds the fit: a fit that
    would go past it returns the cap; one under it is unchanged."""
    true = 0.3 * 4.0 / 2_000_000
    curve = [(4.0, 2_000_000), (2.0, 700_000), (0.5, 100_000)]
    probes = [(2.2, 300_000), (1.6, 1_500_000)]
    points = [(t, w, _device_clock(t, w, true)) for t, w in curve + probes]
    assert fit_weight_cost(points[:3], points[3:], cap=0.5 * true) == 0.5 * true
    assert fit_weight_cost(points[:3], points[3:], cap=2 * true) == pytest.approx(true, rel=1e-9)


def test_weight_cost_is_zero_where_weights_cost_nothing_or_nothing_probes_them():
    curve = [(4.0, 2_000_000), (2.0, 700_000), (0.5, 100_000)]
    probes = [(2.2, 300_000), (1.6, 1_500_000)]
    points = [(t, w, _device_clock(t, w, 0.0)) for t, w in curve + probes]
    assert fit_weight_cost(points[:3], points[3:]) == 0.0
    heavy = [(t, w, _device_clock(t, w, 1e-6)) for t, w in curve]
    assert fit_weight_cost(heavy, []) == 0.0
    with pytest.raises(DeepLSPError, match="at least one curve model"):
        fit_weight_cost([], points)
