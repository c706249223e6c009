"""The DeepLSP pipeline end to end on a tiny registered model, with a deterministic
stand-in for the device clock (tests never assert wall-clock times)."""

import copy
import json
import math
import re
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import deeplsp.pruner as prune_mod
from deeplsp.checkpoint import load_checkpoint
from deeplsp.errors import DeepLSPError
from deeplsp.models import MODELS, ModelEntry
from deeplsp.pruner import PruneConfig, prune
from deeplsp.structure import find_groups, prune_groups
from devices import get_device
from export import export_onnx
from profiling import weight_spill
from profiling.counting import count_onnx, count_torch
from profiling.latency_table import Calibration, LatencyTable, LayerSig
from profiling.runner import LatencyStats


class TinyNet(nn.Module):
    def __init__(self, num_classes, in_channels, input_size):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


# The device's cache probe (profiling.weight_spill) on TinyNet's scale: 584 weights a layer.
SMALL_PROBE = partial(
    weight_spill.free_weights, probe=LayerSig("conv", 8, 8, kernel=3, padding=1, in_hw=4)
)


def _stats(ms: float) -> LatencyStats:
    return LatencyStats.from_samples([ms] * 5, warmup=0)


def _layer_ms(sig) -> float:
    """Fake per-layer clock: proportional to the layer's MACs."""
    if sig.kind == "linear":
        return 1e-6 * sig.in_channels * sig.out_channels + 1e-5
    h, w = sig.out_hw
    return 1e-6 * h * w * sig.out_channels * (sig.in_channels // sig.groups) * 9 + 1e-5


@pytest.fixture(autouse=True)
def _no_host_cache(monkeypatch):
    """The pipeline reads the core cache of the host it runs on (`layer_cache_weights`);
    the tests' devices are fakes, so none is known unless a test says so."""
    monkeypatch.setattr(prune_mod, "layer_cache_weights", lambda device: None)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """Register `tinynet` and replace the device clock by functions of MACs."""
    entry = ModelEntry("tinynet", "test model", TinyNet, "none")
    monkeypatch.setitem(MODELS._entries, "tinynet", entry)
    # power: how latency grows with MACs; log: every timing's true ms, in order;
    # outliers: timing number (1-based, in log order) -> factor (noise)
    # bump: (lo, hi, factor): networks of lo..hi million MACs run `factor` times slower
    # per_weight: ms per parameter past the first `cache`, which the per-layer table does not
    # see; the device's chain probe (profiling.weight_spill) runs on the same clock
    curve = {
        "power": 1.0,
        "log": [],
        "outliers": {},
        "bump": (0.0, 0.0, 1.0),
        "per_weight": 0.0,
        "cache": 0,
        "layer_cache": None,  # what layer_cache_weights says of the device (not this host)
    }

    def network_ms(cost) -> float:
        spilled = max(0, cost.params - curve["cache"])
        return 0.05 + (1e-6 * cost.macs) ** curve["power"] + curve["per_weight"] * spilled

    def clock(cost) -> float:
        macs = cost.macs
        ms = network_ms(cost)
        lo, hi, factor = curve["bump"]
        ms *= factor if lo <= 1e-6 * macs <= hi else 1.0
        curve["log"].append(ms)
        return ms * curve["outliers"].get(len(curve["log"]), 1.0)

    def fake_measure(model, shape, timing, path=None, **kw):
        result = export_onnx(model, shape, path or tmp_path / "cand.onnx")
        ms = clock(count_torch(model, shape))
        return {"latency": _stats(ms).to_dict(), "export": result.to_dict()}

    def fake_time(self, path, iters=None):  # a second timing of a file
        return {"latency": _stats(clock(count_onnx(path))).to_dict()}

    monkeypatch.setattr(prune_mod, "measure_model", fake_measure)
    monkeypatch.setattr(prune_mod.Timing, "time", fake_time)
    monkeypatch.setattr(prune_mod, "free_weights", SMALL_PROBE)
    monkeypatch.setattr(prune_mod, "layer_cache_weights", lambda device: curve["layer_cache"])
    monkeypatch.setattr(
        prune_mod,
        "LatencyTable",
        lambda device, path, **kw: LatencyTable(
            device,
            path,
            measure=lambda s: _stats(_layer_ms(s)),
            measure_network=lambda p: _stats(network_ms(count_onnx(p))),
        ),
    )
    return curve


def _cfg(tmp_path, data, **kw):
    base = dict(
        model="tinynet",
        dataset="fashionmnist",
        out=str(tmp_path / "run"),
        data_dir=str(data),
        cache_dir=str(tmp_path / "cache"),
        calib_batches=2,
        calib_batch_size=16,
        ratios=(1.0, 0.75, 0.5, 0.25),
        iters=5,
        warmup=1,
    )
    base.update(kw)
    return PruneConfig(**base)


def _dense_ms(report):
    return report["dense"]["latency_ms"]["median"]


def test_budget_run_delivers_a_smaller_measured_model_and_all_outputs(
    tmp_path, tiny, fashionmnist_dir
):
    probe = prune(_cfg(tmp_path, fashionmnist_dir, budget_ms=1e6), log=lambda s: None)
    budget = 0.5 * _dense_ms(probe)
    r = prune(_cfg(tmp_path, fashionmnist_dir, budget_ms=budget), log=lambda s: None)
    out = tmp_path / "run"
    for name in ("model.onnx", "pruned.pt", "report.json", "report.md", "report.png"):
        assert (out / name).is_file(), name
    delivered = r["pruned"]["latency_ms"]["median"]
    assert delivered <= budget
    assert r["pruned"]["cost"]["macs"] < r["dense"]["cost"]["macs"]
    assert 1 <= len(r["search"]) <= 4
    # the knapsack's default selection reads every candidate's adaptive-BN loss
    assert all(isinstance(c["score"], float) and c["score"] > 0 for c in r["search"])
    assert r["config"]["selection"] == "adaptive-bn"
    assert "adaptive-BN loss" in (out / "report.md").read_text()
    ratios = {g["id"]: g["ratio"] for g in r["groups"]}
    assert min(ratios.values()) < 1.0
    # the checkpoint rebuilds the pruned architecture
    rebuilt = load_checkpoint(out / "pruned.pt", expect_model="tinynet").build_model()
    assert sum(p.numel() for p in rebuilt.parameters()) == r["pruned"]["cost"]["params"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["config"]["budget_ms"] == budget and saved["budget_ms"] == budget
    assert "Per-group keep ratios" in (out / "report.md").read_text()
    # what fine-tuning did: the pruned network's accuracy before it, in the report too
    before = r["pruned"]["test_before_finetune"]["top1"]
    row = rf"\| test top-1 before fine-tuning +\| +\| +{re.escape(f'{before:.2%}')} +\|"
    assert re.search(row, (out / "report.md").read_text())
    said = "The pruned model is fine-tuned 1 epoch(s) on all training images: cross-entropy "
    assert said + "plus 0.5 x the distillation loss" in (out / "report.md").read_text()


def test_second_run_reuses_sensitivity_and_latency_table(tmp_path, tiny, fashionmnist_dir):
    cfg = _cfg(tmp_path, fashionmnist_dir, keep_ratio=0.6, finetune_epochs=0, sensitivity="context")
    first = prune(cfg, log=lambda s: None)
    second = prune(cfg, log=lambda s: None)
    assert not first["sensitivity_cached"] and second["sensitivity_cached"]
    # the knapsack's table, measured around the uniform network at the keep ratio, too
    assert first["sensitivity"]["mode"] == "context" and first["sensitivity"]["ratio"] == 0.5
    assert not first["sensitivity"]["cached"] and second["sensitivity"]["cached"]
    assert first["pruned"]["test_before_finetune"] is None  # no fine-tuning, nothing before
    md = (tmp_path / "run" / "report.md").read_text()
    assert "The pruned model is not fine-tuned (`--finetune-epochs 0`)" in md
    assert first["latency_table"]["new_rows"] > 0 and second["latency_table"]["new_rows"] == 0


def test_taylor_importance_removes_the_channels_taylor_ranks_lowest(
    tmp_path, tiny, fashionmnist_dir
):
    from deeplsp.datasets import calibration_batches
    from deeplsp.structure import find_groups, removal_order

    cfg = _cfg(tmp_path, fashionmnist_dir, keep_ratio=0.5, finetune_epochs=0, importance="taylor")
    r = prune(cfg, log=lambda s: None)
    assert r["config"]["importance"] == "taylor"
    out = tmp_path / "run"
    dense = load_checkpoint(out / "dense.pt").build_model().eval()
    shape = (1, 1, 32, 32)
    batches = calibration_batches("fashionmnist", fashionmnist_dir, 2, 16, 0)
    keeps = {g["id"]: g["keep"] for g in r["groups"]}
    # the first group cut whose conv reads every input channel: its weights show the choice
    first = next(g.id for g in find_groups(dense, shape) if keeps[g.id] < g.channels)
    keep = keeps[first]
    taylor = removal_order(dense, shape, "taylor", batches)[first]
    l1 = removal_order(dense, shape, "l1")[first]
    kept = sorted(taylor[len(taylor) - keep :])
    assert kept != sorted(l1[len(l1) - keep :])  # the two criteria disagree here
    pruned = load_checkpoint(out / "pruned.pt").build_model()
    conv = dict(pruned.named_modules())[first]
    dense_conv = dict(dense.named_modules())[first]
    assert conv.in_channels == dense_conv.in_channels
    torch.testing.assert_close(conv.weight, dense_conv.weight[kept])


def test_closed_loop_corrects_a_wrong_prediction(tmp_path, tiny, fashionmnist_dir):
    tiny["power"] = 1.6  # the device is not linear in the table: calibration must be corrected
    probe = prune(
        _cfg(tmp_path, fashionmnist_dir, budget_ms=1e6, finetune_epochs=0), log=lambda s: None
    )
    budget = 0.4 * _dense_ms(probe)
    r = prune(
        _cfg(tmp_path, fashionmnist_dir, budget_ms=budget, finetune_epochs=0, max_iterations=5),
        log=lambda s: None,
    )
    measured = [c["measured"]["latency"]["median"] for c in r["search"]]
    assert r["pruned"]["latency_ms"]["median"] <= budget
    assert len(measured) <= 5
    assert r["calibration"]["points"] >= 2


def test_calibration_measures_what_weights_cost_inside_the_network(
    tmp_path, tiny, fashionmnist_dir
):
    """The device charges every parameter, which the per-layer table does not: the two
    tilted calibration networks find that cost (not exactly: the device's offset and the
    BatchNorm parameters are not in the table's terms) and the report states it."""
    tiny["per_weight"] = 2e-5  # about as much as the dense table sum, in ms
    cfg = _cfg(tmp_path, fashionmnist_dir, budget_ms=1e6, finetune_epochs=0)
    lines = []
    probe = prune(cfg, log=lines.append)
    assert probe["calibration"]["points"] == 5 + prune_mod.RANDOM_NETWORKS
    assert any(
        s.startswith("calibration: middle") and "weight-heavy kept" in s and "random 3" in s
        for s in lines
    )
    assert probe["calibration"]["weight_cost"] == pytest.approx(2e-5, rel=0.3)
    # every weight costs the same on this device: the chain probe finds no knee
    assert probe["calibration"]["free_weights"]["free_weights"] is None
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Each weight also costs" in md and "table ms per million weights" in md
    assert "timed with the activation it feeds, by ONNX Runtime's kernel time" in md


def test_the_run_says_which_weights_it_charges_where_the_core_cache_is_known(
    tmp_path, tiny, fashionmnist_dir
):
    """No knee, the core's cache known: the log, the report and report.json say that only
    the weights of layers on a 1x1 map within that cache are charged."""
    tiny["layer_cache"] = 1000
    lines = []
    cfg = _cfg(tmp_path, fashionmnist_dir, budget_ms=1e6, finetune_epochs=0)
    probe = prune(cfg, log=lines.append)
    assert probe["calibration"]["layer_cache_weights"] == 1000
    said = "weights are charged in layers on a 1x1 map with at most 1,000 (the core's cache)"
    assert any(said in s for s in lines)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Each weight of a layer on a 1x1 map whose weights fit the core's cache" in md
    assert "(at most 1,000)" in md


def test_the_report_says_why_streamed_weights_are_charged():
    """Streamed weights are charged where the device has no knee or one past the dense
    network's weights; the report says which."""
    from deeplsp.report import _weight_cost_line

    cal = {"weight_cost": 2e-7, "layer_cache_weights": 524288, "free_weights": {}}
    assert "the device has no cache knee" in _weight_cost_line(cal)
    cal["free_weights"] = {"free_weights": 11_450_000, "chain": [[1, 1, 1.0]]}
    line = _weight_cost_line(cal)
    assert line.startswith("Each weight of a layer on a 1x1 map whose weights fit")
    assert "the device's cache knee, 11.45M weights, lies past the dense network's" in line


def test_weights_cost_only_past_the_devices_cache(tmp_path, tiny, fashionmnist_dir):
    """A device that charges weights only past its first 4,000: the chain probe finds
    that knee, the calibration fits the cost of the weights past it, the report says
    so, and the search still meets its budget."""
    tiny["per_weight"] = 4e-5
    tiny["cache"] = 4000  # TinyNet has about 14,000; its smallest networks fit
    lines = []
    cfg = _cfg(tmp_path, fashionmnist_dir, budget_ms=1e6, finetune_epochs=0)
    probe = prune(cfg, log=lines.append)
    knee = probe["calibration"]["free_weights"]
    assert knee["free_weights"] == pytest.approx(4000, abs=584)  # within a probe layer
    assert knee["per_million_weights_ms"] == pytest.approx(40, rel=0.05)
    said = f"keeps {knee['free_weights']:,} weights in cache inside a network"
    assert any(said in s for s in lines)
    assert probe["calibration"]["weight_cost"] == pytest.approx(4e-5, rel=0.3)
    md = (tmp_path / "run" / "report.md").read_text()
    assert f"The network's weights past the first {knee['free_weights']:,} also cost" in md
    # the dense TinyNet (returned: the budget is above it) is past the knee, and says so
    assert probe["pruned"]["layer_weights"] > knee["free_weights"]
    assert "layer weights are past that knee" in md
    # the dense model is past the knee: files under it are paired with a smaller reference
    ref = probe["timing"]["in_cache"]
    assert ref["free_weights"] == knee["free_weights"]
    assert ref["weights"] <= knee["free_weights"] / 2
    assert any(s.startswith("paired timing: files with at most") for s in lines)
    assert "were timed against a uniform pruned network with" in md
    budget = 0.5 * _dense_ms(probe)
    r = prune(replace(cfg, budget_ms=budget), log=lambda s: None)
    assert r["pruned"]["latency_ms"]["median"] <= budget
    fits = r["pruned"]["layer_weights"] <= r["calibration"]["free_weights"]["free_weights"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert ("layer weights fit under that knee" in md) == fits


def test_the_weight_cost_predicts_networks_whose_weights_the_uniform_ones_misjudge(
    tmp_path, monkeypatch
):
    """Every pruned TinyNet on a device where weights cost more than the table's MACs say:
    the calibration with its fitted weight cost predicts all 64 within 10%; the old one
    (a curve through the dense, middle and smallest networks alone) is off by 40%."""
    import itertools

    from deeplsp.structure import find_groups
    from devices import DEVICES

    shape = (1, 1, 16, 16)
    model = TinyNet(10, 1, 16).eval()
    groups = find_groups(model, shape)
    candidates = prune_mod.candidate_keeps(groups, (1.0, 0.75, 0.5, 0.25), 1)

    def clock(net: nn.Module) -> float:
        cost = count_torch(net, shape)
        return 0.05 + 1e-6 * cost.macs + 1e-4 * cost.params

    timed = []  # every timing's network (a re-timing: the last one exported)

    def fake_measure(net, *a, **kw):
        timed.append(net)
        return {"latency": {"median": clock(net)}}

    monkeypatch.setattr(prune_mod, "measure_model", fake_measure)
    again = SimpleNamespace(time=lambda path, **kw: fake_measure(timed[-1]))
    table = LatencyTable(
        DEVICES.get("cpu"), tmp_path / "t.sqlite", measure=lambda s: _stats(_layer_ms(s))
    )
    with table:
        lat = prune_mod.LatencyModel(model, shape, groups, table)
        once, _ = prune_mod.calibrate(lat, model, shape, again, candidates, clock(model))
        n_once, timed[:] = len(timed), []
        retime = prune_mod.WEIGHT_COST_NETWORKS
        lat = prune_mod.LatencyModel(model, shape, groups, table)
        calib, _ = prune_mod.calibrate(
            lat, model, shape, again, candidates, clock(model), retime=retime
        )
        # the networks asked for are timed three times (a noiseless clock: the same fit)
        assert len(timed) == n_once + 2 * len(retime)
        assert calib.fit_points == once.fit_points
        assert lat.weight_cost > 0
        nets = [
            dict(zip(candidates, k, strict=True)) for k in itertools.product(*candidates.values())
        ]
        truth = [clock(prune_groups(copy.deepcopy(model), shape, k)) for k in nets]
        errors = [
            abs(calib.predict(lat.table_sum(k)) / t - 1) for k, t in zip(nets, truth, strict=True)
        ]
        assert max(errors) < 0.10
        lat.weight_cost = 0.0
        uniform = [{g: pick(c) for g, c in candidates.items()} for pick in (max, min)]
        uniform.insert(1, {g: sorted(c)[len(c) // 2] for g, c in candidates.items()})
        old = Calibration.fit(
            [lat.table_sum(k) for k in uniform],
            [clock(prune_groups(copy.deepcopy(model), shape, k)) for k in uniform],
        )
        old_errors = [
            abs(old.predict(lat.table_sum(k)) / t - 1) for k, t in zip(nets, truth, strict=True)
        ]
        assert max(old_errors) > 0.40


def _streamed_weights(net: nn.Module, shape: tuple[int, ...], limit: int) -> int:
    """The weights of `net`'s layers on a 1x1 output map with at most `limit` each."""
    found = []

    def hook(m, i, o):
        if o.dim() == 2 or o.shape[-2:] == (1, 1):
            found.append(m.weight.numel() if m.weight.numel() <= limit else 0)

    layers = [m for m in net.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        net.eval()(torch.zeros(shape))
    for h in handles:
        h.remove()
    return sum(found)


def test_only_streamed_layers_weights_are_charged_where_the_core_cache_is_known(tmp_path):
    """With the core's cache known and no knee, a layer's weights are charged only where it
    works on a 1x1 map and they fit that cache; the knapsack's per-group charges still add
    up to `table_sum`; a knee (or no cache figure) charges every weight as before."""
    from deeplsp.structure import find_groups
    from devices import DEVICES

    shape = (1, 1, 4, 4)  # TinyNet's last convolution works on a 1x1 map here
    model = TinyNet(10, 1, 4).eval()
    groups = find_groups(model, shape)
    candidates = prune_mod.candidate_keeps(groups, (1.0, 0.5, 0.25), 1)
    full = {g: max(c) for g, c in candidates.items()}
    table = LatencyTable(
        DEVICES.get("cpu"), tmp_path / "t.sqlite", measure=lambda s: _stats(_layer_ms(s))
    )
    with table:
        lat = prune_mod.LatencyModel(model, shape, groups, table)
        sigs = {lk.name: lat.sig_at(lk, full) for lk in lat.links}
        assert sigs["features.6"].out_hw == (1, 1) and sigs["features.3"].out_hw == (2, 2)
        no_knee = weight_spill.Knee(None, 1.0, 0.0, ())
        last, fc = sigs["features.6"].weights, sigs["fc"].weights  # 32x32x3x3 + bias, 32x10 + 10
        lat.use_knee(no_knee, layer_cache=last)
        charged = {n: lat.chargeable(s) for n, s in sigs.items()}
        assert charged == {"features.0": 0, "features.3": 0, "features.6": last, "fc": fc}
        assert lat.priced(full) == last + fc
        lat.use_knee(no_knee, layer_cache=last - 1)  # the 3x3 layer no longer fits: read cold
        assert lat.priced(full) == fc
        lat.weight_cost = 1e-6
        assert lat.table_sum(full) == pytest.approx(lat.parts(full)[0] + 1e-6 * fc)
        per, base = lat.options(full, {g: [max(c)] for g, c in candidates.items()})
        total = base + sum(v[full[g]] for g, v in per.items())
        assert total == pytest.approx(lat.table_sum(full))
        # a knee, or no figure for the cache: every weight, as before
        lat.use_knee(weight_spill.Knee(1000, 1.0, 1e-6, ()), layer_cache=last)
        assert lat.layer_cache is None and lat.priced(full) == lat.parts(full)[1] - 1000
        lat.use_knee(no_knee)
        assert lat.priced(full) == lat.parts(full)[1]
        # a knee past the dense network's weights prices nothing, so the core's cache rules
        assert lat.dense_weights == lat.parts(full)[1]
        beyond = weight_spill.Knee(lat.dense_weights, 1.0, 1e-6, ())
        lat.use_knee(beyond, layer_cache=last)
        assert (lat.free_weights, lat.layer_cache) == (None, last)
        assert lat.priced(full) == last + fc
        lat.use_knee(beyond)  # no cache figure: no weight reaches the knee, none is charged
        assert lat.free_weights == lat.dense_weights and lat.priced(full) == 0


def test_the_weight_cost_on_streamed_layers_predicts_a_device_that_pays_only_for_those(
    tmp_path, monkeypatch
):
    """A device whose only in-network cost beyond the table is the weights of its layers on
    a 1x1 map (the last convolution and the classifier here): calibrated with the core's
    cache known, every pruned TinyNet is predicted within 5%; charging every weight
    instead is further off."""
    import itertools

    from deeplsp.structure import find_groups
    from devices import DEVICES

    shape = (1, 1, 4, 4)
    model = TinyNet(10, 1, 4).eval()
    groups = find_groups(model, shape)
    candidates = prune_mod.candidate_keeps(groups, (1.0, 0.75, 0.5, 0.25), 1)

    def clock(net: nn.Module) -> float:
        macs = count_torch(net, shape).macs
        return 0.01 + 1e-5 * macs + 5e-5 * _streamed_weights(net, shape, 10**6)

    def fake_measure(net, *a, **kw):
        return {"latency": {"median": clock(net)}}

    monkeypatch.setattr(prune_mod, "measure_model", fake_measure)
    table = LatencyTable(
        DEVICES.get("cpu"), tmp_path / "t.sqlite", measure=lambda s: _stats(_layer_ms(s))
    )
    nets = [dict(zip(candidates, k, strict=True)) for k in itertools.product(*candidates.values())]
    truth = [clock(prune_groups(copy.deepcopy(model), shape, k)) for k in nets]
    worst = {}
    with table:
        for cache in (10**6, None):
            lat = prune_mod.LatencyModel(model, shape, groups, table)
            lat.use_knee(weight_spill.Knee(None, 1.0, 0.0, ()), layer_cache=cache)
            calib, _ = prune_mod.calibrate(lat, model, shape, None, candidates, clock(model))
            worst[cache] = max(
                abs(calib.predict(lat.table_sum(k)) / t - 1)
                for k, t in zip(nets, truth, strict=True)
            )
    assert worst[10**6] < 0.05, worst  # 1.3% here
    assert worst[None] > 0.15, worst  # 26%


def test_latency_model_times_each_layer_with_the_activation_it_feeds(tmp_path):
    """MobileNetV3-L: hard-swish after the stem, the late expansions and depthwise convs and
    the classifier's hidden layer; ReLU then hard-sigmoid in the squeeze-excitation blocks;
    nothing after the projections, whose output is the block's."""
    from deeplsp.models import build_model

    shape = (1, 1, 32, 32)
    model = build_model("mobilenet_v3_large", num_classes=10, in_channels=1, input_size=32)
    groups = find_groups(model.eval(), shape)
    table = LatencyTable(get_device("cpu"), tmp_path / "t.sqlite", measure=lambda s: _stats(1.0))
    with table:
        sigs = prune_mod.LatencyModel(model, shape, groups, table).sigs
    acts = {name: sig.act for name, sig in sigs.items()}
    assert acts["features.0.0"] == "hardswish"
    assert acts["features.2.block.0.0"] == acts["features.2.block.1.0"] == "relu"
    assert acts["features.2.block.2.0"] == ""
    assert acts["features.12.block.0.0"] == acts["features.12.block.1.0"] == "hardswish"
    assert (acts["features.12.block.2.fc1"], acts["features.12.block.2.fc2"]) == (
        "relu",
        "hardsigmoid",
    )
    assert (acts["classifier.0"], acts["classifier.3"]) == ("hardswish", "")
    pruned = sigs["features.12.block.0.0"].with_channels(56, 336)
    assert pruned.act == "hardswish" and pruned.key().endswith("/hardswish")


def test_tilted_networks_put_the_weight_heavy_groups_at_opposite_ends(tmp_path):
    from deeplsp.structure import find_groups
    from devices import DEVICES

    shape = (1, 1, 16, 16)
    model = TinyNet(10, 1, 16).eval()
    groups = find_groups(model, shape)
    candidates = prune_mod.candidate_keeps(groups, (1.0, 0.5, 0.25), 1)
    table = LatencyTable(
        DEVICES.get("cpu"), tmp_path / "t.sqlite", measure=lambda s: _stats(_layer_ms(s))
    )
    with table:
        lat = prune_mod.LatencyModel(model, shape, groups, table)
        cut, kept = prune_mod.tilted(lat, candidates)
        for g, c in candidates.items():  # every group at an end, the two complementary
            assert {cut[g], kept[g]} == {min(c), max(c)}
        (cut_ms, cut_w), (kept_ms, kept_w) = lat.parts(cut), lat.parts(kept)
        assert cut_w / cut_ms < kept_w / kept_ms  # weights per table ms
        assert lat.table_sum(cut) == cut_ms  # no weight cost until calibrated
        lat.weight_cost = 1e-6
        assert lat.table_sum(cut) == pytest.approx(cut_ms + 1e-6 * cut_w)
        # the knapsack's per-group charges add up to the same sum
        full = {g: max(c) for g, c in candidates.items()}
        per, base = lat.options(full, {g: [max(c)] for g, c in candidates.items()})
        total = base + sum(v[full[g]] for g, v in per.items())
        assert total == pytest.approx(lat.table_sum(full))


def test_calibration_networks_add_seeded_random_mixes_to_the_uniform_and_tilted_ones(tmp_path):
    from deeplsp.structure import find_groups
    from devices import DEVICES

    shape = (1, 1, 16, 16)
    model = TinyNet(10, 1, 16).eval()
    groups = find_groups(model, shape)
    candidates = prune_mod.candidate_keeps(groups, prune_mod.RATIOS, 1)
    table = LatencyTable(
        DEVICES.get("cpu"), tmp_path / "t.sqlite", measure=lambda s: _stats(_layer_ms(s))
    )
    with table:
        lat = prune_mod.LatencyModel(model, shape, groups, table)
        nets = prune_mod.calibration_networks(lat, candidates)
        randoms = [f"random {i + 1}" for i in range(prune_mod.RANDOM_NETWORKS)]
        names = ["dense", "middle", "smallest", "weight-heavy cut", "weight-heavy kept"]
        assert list(nets) == names + randoms
        assert nets["dense"] == {g: max(c) for g, c in candidates.items()}
        assert nets["smallest"] == {g: min(c) for g, c in candidates.items()}
        assert (nets["weight-heavy cut"], nets["weight-heavy kept"]) == prune_mod.tilted(
            lat, candidates
        )
        mixed = [nets[n] for n in randoms]
        assert all(k[g] in candidates[g] for k in mixed for g in candidates)
        # not every group at one ratio (the uniform networks' shape)
        assert any(len({k[g] / max(c) for g, c in candidates.items()}) > 1 for k in mixed)
        assert prune_mod.calibration_networks(lat, candidates) == nets  # seeded
        other = prune_mod.calibration_networks(lat, candidates, seed=1)
        assert [other[n] for n in randoms] != mixed


def test_calibration_line_names_a_network_that_repeats_an_earlier_one():
    """Where no group has charged weights the tilted networks are the dense and smallest
    ones: the log says so instead of listing them as if they were timed apart."""
    nets = {
        "dense": {"a": 8},
        "middle": {"a": 4},
        "smallest": {"a": 1},
        "weight-heavy cut": {"a": 8},
        "weight-heavy kept": {"a": 1},
        "random 1": {"a": 4},
    }
    ms = {"dense": 3.0, "middle": 1.5, "smallest": 0.5}
    ms |= {"weight-heavy cut": 3.0, "weight-heavy kept": 0.5, "random 1": 1.5}
    assert prune_mod.calibration_line(nets, ms) == (
        "middle 1.500 ms, smallest 0.500 ms, weight-heavy cut = dense, "
        "weight-heavy kept = smallest, random 1 = middle"
    )


def test_budget_below_the_smallest_reachable_latency_is_a_clear_error(
    tmp_path, tiny, fashionmnist_dir
):
    with pytest.raises(DeepLSPError, match=r"below the smallest reachable latency: [0-9.]+ ms"):
        prune(_cfg(tmp_path, fashionmnist_dir, budget_ms=1e-4), log=lambda s: None)


def test_budget_above_dense_returns_the_dense_model(tmp_path, tiny, fashionmnist_dir):
    r = prune(
        _cfg(tmp_path, fashionmnist_dir, budget_ms=1e6, finetune_epochs=0), log=lambda s: None
    )
    assert "returned unpruned" in r["status"]
    assert all(g["keep"] == g["channels"] for g in r["groups"])


def test_keep_ratio_allocates_by_sensitivity(tmp_path, tiny, fashionmnist_dir):
    import deeplsp  # the package-level Python API, with the config's fields as keywords

    cfg = _cfg(tmp_path, fashionmnist_dir, keep_ratio=0.5, finetune_epochs=0)
    r = deeplsp.prune(**cfg.to_dict())
    kept = sum(g["keep"] for g in r["groups"])
    total = sum(g["channels"] for g in r["groups"])
    assert kept <= 0.5 * total


@pytest.mark.parametrize("amount", [0.3, "adaptive"])
def test_unstructured_zeros_survive_fine_tuning(tmp_path, tiny, fashionmnist_dir, amount):
    r = prune(
        _cfg(tmp_path, fashionmnist_dir, keep_ratio=0.75, amount=amount, finetune_epochs=1),
        log=lambda s: None,
    )
    model = load_checkpoint(tmp_path / "run" / "pruned.pt").build_model()
    per_layer = r["unstructured"]["per_layer"]
    modules = dict(model.named_modules())
    total = sum(modules[n].weight.numel() for n in per_layer)
    zeros = sum(int((modules[n].weight == 0).sum()) for n in per_layer)
    expected = sum(round(a * modules[n].weight.numel()) for n, a in per_layer.items())
    assert zeros >= expected > 0
    if amount == "adaptive":
        assert len({round(a, 6) for a in per_layer.values()}) > 1  # not one fraction for all
        weighted = sum(a * modules[n].weight.numel() for n, a in per_layer.items()) / total
        assert math.isclose(weighted, 0.05, rel_tol=0.05)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({}, "exactly one of"),
        ({"budget_ms": 1.0, "keep_ratio": 0.5}, "exactly one of"),
        ({"budget_ms": -1.0}, "budget-ms"),
        ({"keep_ratio": 1.5}, "keep-ratio"),
        ({"budget_ms": 1.0, "amount": "lots"}, "amount"),
        ({"budget_ms": 1.0, "amount": 1.0}, "amount"),
        ({"budget_ms": 1.0, "climb": -1}, r"climb must be >= 0 \(got -1\)"),
        ({"budget_ms": 1.0, "short_images": 0}, r"short_images must be >= 1 \(got 0\)"),
        (
            {"budget_ms": 1.0, "sensitivity": "joint"},
            r"--sensitivity must be one of context, dense \(got 'joint'\)",
        ),
        (
            {"budget_ms": 1.0, "allocation": "threshold", "selection": "short-finetune"},
            "--selection short-finetune chooses among knapsack answers",
        ),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(DeepLSPError, match=match):
        PruneConfig(model="resnet18", dataset="fashionmnist", out="x", **kw)


def test_wrong_checkpoint_model_is_refused(tmp_path, tiny, fashionmnist_dir):
    from deeplsp.checkpoint import save_checkpoint
    from deeplsp.models import build_model

    build = {"num_classes": 10, "in_channels": 1, "input_size": 32}
    path = save_checkpoint(tmp_path / "r.pt", build_model("tinynet", **build), "tinynet", build)
    with pytest.raises(DeepLSPError, match="holds a tinynet checkpoint, not resnet18"):
        prune(
            _cfg(tmp_path, fashionmnist_dir, model="resnet18", checkpoint=str(path), budget_ms=1.0),
            log=lambda s: None,
        )


class _StubLatency:
    """Per-group table latency at each candidate: group `slow` costs 10x per channel."""

    def __init__(self, per_channel):
        self.per_channel = per_channel

    def options(self, keeps, candidates):
        per = {g: {k: self.per_channel[g] * k for k in c} for g, c in candidates.items()}
        return per, 0.0


def test_keep_ratio_places_channels_by_sensitivity_and_latency():
    from deeplsp.pruner import allocate_channels
    from deeplsp.structure import ChannelGroup

    groups = [ChannelGroup("fast", 8, ("fast",), ()), ChannelGroup("slow", 8, ("slow",), ())]
    candidates = {"fast": [2, 4, 6, 8], "slow": [2, 4, 6, 8]}
    flat = {g: {k: 0.1 * (8 - k) for k in c} for g, c in candidates.items()}  # equal harm
    lat = _StubLatency({"fast": 1.0, "slow": 10.0})
    keeps, _ = allocate_channels(groups, candidates, flat, 0.5, lat)
    assert sum(keeps.values()) <= 8 and keeps["slow"] < keeps["fast"]  # latency decides
    # without latency the tie is broken toward keeping channels, not toward a group
    keeps0, _ = allocate_channels(groups, candidates, flat, 0.5, lat, latency_weight=0)
    assert sum(keeps0.values()) == 8
    # a group whose channels matter a lot keeps them despite its latency
    harmful = {"fast": flat["fast"], "slow": {k: 5.0 * (8 - k) for k in candidates["slow"]}}
    keeps_h, _ = allocate_channels(groups, candidates, harmful, 0.5, lat)
    assert keeps_h["slow"] > keeps_h["fast"]
    # sensitivities all zero: the ratio is still met, not undershot
    zero = {g: dict.fromkeys(c, 0.0) for g, c in candidates.items()}
    keeps_z, _ = allocate_channels(groups, candidates, zero, 0.5, lat)
    assert sum(keeps_z.values()) == 8


def test_tensorrt_device_through_an_agent_rounds_channels_and_delivers_its_engine(
    tmp_path, tiny, fashionmnist_dir, monkeypatch
):
    """`--device jetson-orin --device-url ...`: channel counts in the Orin's multiples of
    8, the engine built through the device (here a stand-in for the agent's build)."""
    from profiling import target

    fp = {"id": "orin-fp", "model": "NVIDIA Jetson AGX Orin", "gpu": {"name": "Orin"}}
    monkeypatch.setattr(target, "fingerprint", lambda device: dict(fp))
    built = []

    def fake_build(device, onnx_path, engine_path, calibration=None):
        assert device.url == "http://orin.test:8765" and onnx_path.is_file()
        engine_path.write_bytes(b"engine")
        built.append(device.name)
        meta = {"precision": device.precision, "tensorrt_version": "10.3.0", "gpu": "Orin"}
        return {**meta, "build_seconds": 1.0}

    monkeypatch.setattr(target, "build_engine", fake_build)
    cfg = _cfg(
        tmp_path,
        fashionmnist_dir,
        keep_ratio=0.5,
        finetune_epochs=0,
        device="jetson-orin",
        device_url="http://orin.test:8765",
    )
    r = prune(cfg, log=lambda s: None)
    assert built == ["jetson-orin"] and (tmp_path / "run" / "model.engine").is_file()
    assert r["files"]["engine"] == "model.engine" and r["engine"]["precision"] == "fp16"
    assert all(g["keep"] % 8 == 0 for g in r["groups"])
    md = (tmp_path / "run" / "report.md").read_text()
    assert "through the agent at http://orin.test:8765" in md and "model.engine" in md


def test_an_outlier_timing_is_timed_again_not_chased(tmp_path, tiny, fashionmnist_dir):
    """One candidate timed 40% slow (a burst on a shared machine) is re-timed and the
    median kept: the search does not over-correct into a far smaller network."""
    probe = prune(_cfg(tmp_path, fashionmnist_dir, budget_ms=1e6), log=lambda s: None)
    budget = 0.6 * _dense_ms(probe)
    clean = prune(_cfg(tmp_path, fashionmnist_dir, budget_ms=budget), log=lambda s: None)
    first = clean["search"][0]["measured"]
    # timings before the search: the dense model three times and every other distinct
    # calibration network once (a random one can repeat another on the tiny net)
    assert len(clean["calibration"]["measured_ms"]) == 5 + prune_mod.RANDOM_NETWORKS
    assert len(clean["dense"]["timings_ms"]) == 3
    before = 2 + len(set(clean["calibration"]["measured_ms"].values()))
    tiny["log"].clear()
    prune(_cfg(tmp_path, fashionmnist_dir, budget_ms=budget), log=lambda s: None)
    assert tiny["log"][before] == first["latency"]["median"]
    # the same run, with the first timing of the first candidate 40% slow
    tiny["log"].clear()
    tiny["outliers"] = {before + 1: 1.4}
    noisy = prune(_cfg(tmp_path, fashionmnist_dir, budget_ms=budget), log=lambda s: None)
    timed = noisy["search"][0]["measured"]
    assert timed["timings_ms"][0] == pytest.approx(1.4 * first["latency"]["median"])
    assert timed["latency"]["median"] == pytest.approx(first["latency"]["median"])
    assert [g["keep"] for g in noisy["groups"]] == [g["keep"] for g in clean["groups"]]


@pytest.fixture
def drifting(monkeypatch):
    """`tinynet` on a device that gets 4% slower with every timing window: a file's
    timing is a function of its MACs times the drift so far. Returns that function
    (without drift) and the list of windows timed."""
    monkeypatch.setitem(MODELS._entries, "tinynet", ModelEntry("tinynet", "t", TinyNet, "none"))
    monkeypatch.setattr(
        prune_mod,
        "LatencyTable",
        lambda device, path, **kw: LatencyTable(
            device,
            path,
            measure=lambda s: _stats(_layer_ms(s)),
            measure_network=lambda p: _stats(true_ms(p)),  # the chain probe, undrifted
        ),
    )
    windows = []

    def true_ms(path) -> float:
        return 0.05 + 1e-6 * count_onnx(path).macs

    def measure_many(device, paths, warmup, iters, repeats=1):
        for path in paths:
            windows.append(path)
            yield _stats(true_ms(path) * 1.04 ** len(windows))

    monkeypatch.setattr(prune_mod.target, "measure_many", measure_many)
    monkeypatch.setattr(prune_mod, "free_weights", SMALL_PROBE)
    return true_ms, windows


def test_paired_timing_holds_the_dense_models_speed_while_the_device_drifts(
    tmp_path, drifting, fashionmnist_dir
):
    true_ms, windows = drifting
    cfg = _cfg(tmp_path, fashionmnist_dir, budget_ms=1e6, finetune_epochs=0)
    budget = 0.5 * _dense_ms(prune(cfg, log=lambda s: None))
    windows.clear()
    r = prune(replace(cfg, budget_ms=budget), log=lambda s: None)
    out = tmp_path / "run"
    # the dense model: the median of its first three windows, the second
    assert _dense_ms(r) == pytest.approx(budget / 0.5)
    assert r["dense"]["timings_ms"] == pytest.approx(
        [_dense_ms(r) / 1.04, _dense_ms(r), _dense_ms(r) * 1.04]
    )
    # Every later file was timed against the dense model: its figure is its true latency
    # at the speed of that second window, however slow the device had become since.
    delivered = true_ms(out / "model.onnx") * 1.04**2
    assert r["pruned"]["latency_ms"]["median"] == pytest.approx(delivered)
    assert r["pruned"]["ratio_to_dense"] == pytest.approx(delivered / _dense_ms(r))
    assert r["pruned"]["latency_as_timed_ms"]["median"] > 2 * delivered
    assert delivered <= budget
    for c in r["search"]:
        assert c["measured"]["as_timed"]["median"] > c["measured"]["latency"]["median"]
    assert len(windows) > 40
    timing = {k: r["timing"][k] for k in ("mode", "rounds", "dense_ms")}
    assert timing == {"mode": "paired", "rounds": 5, "dense_ms": _dense_ms(r)}
    # the device slowed evenly: pairing cancels it, and the drift check sees none
    drift = r["timing"]["drift"]
    assert drift["change"] == pytest.approx(0.0, abs=1e-9) and drift["steady"]
    md = (out / "report.md").read_text()
    assert "timed alternately with it in 5 rounds" in md
    assert "within the 5% this run treats as steady" in md


def test_the_drift_check_says_when_the_devices_speed_changed_during_the_run(
    tmp_path, drifting, fashionmnist_dir
):
    """Timed absolutely, a device that slows 4% a window has slowed by far more than 5%
    between calibration and delivery: the middle calibration network, timed again, says
    so in the log and the report."""
    _, windows = drifting
    cfg = _cfg(tmp_path, fashionmnist_dir, keep_ratio=0.5, finetune_epochs=0, timing="absolute")
    lines = []
    r = prune(cfg, log=lines.append)
    drift = r["timing"]["drift"]
    # timed at calibration (after the dense model's three windows) and again just before
    # the delivered model's three
    middle = windows[3]
    assert middle.name == "calibration-middle.onnx" and windows[-4] == middle
    assert windows.count(middle) == 2
    assert drift["at_calibration_ms"] == pytest.approx(r["calibration"]["measured_ms"]["middle"])
    slowed = drift["at_delivery_ms"] / drift["at_calibration_ms"]
    assert slowed == pytest.approx(1.04 ** (len(windows) - 4 - 3)) and slowed > 1.05
    assert drift["change"] == pytest.approx(slowed - 1) and not drift["steady"]
    assert any(s.startswith("drift check:") and "speed changed" in s for s in lines)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "The device's speed changed during the run" in md


def test_absolute_timing_times_each_file_alone(tmp_path, drifting, fashionmnist_dir):
    _, windows = drifting
    cfg = _cfg(tmp_path, fashionmnist_dir, keep_ratio=0.5, finetune_epochs=0, timing="absolute")
    r = prune(cfg, log=lambda s: None)
    # dense and the delivered one three times each, every other distinct calibration
    # network once (a random one can repeat another on the tiny net), the middle twice
    distinct = len(set(r["calibration"]["measured_ms"].values()))
    assert len(windows) == 6 + distinct
    assert r["pruned"]["ratio_to_dense"] is None and r["timing"]["mode"] == "absolute"
    assert "alternately" not in (tmp_path / "run" / "report.md").read_text()


def _conv_net(channels: int) -> nn.Module:
    """A chain of two 3x3 convolutions: 18 x channels^2 layer weights."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3)
    ).eval()


def test_files_under_the_knee_are_timed_against_the_in_cache_reference(tmp_path, monkeypatch):
    """A neighbour's memory traffic slows every file past the device's 4,000 free weights
    by 60% (the dense one among them) and none under it. Paired with the dense model
    alone, a small file reads 1/1.6 of its latency while the neighbour runs; paired with
    a reference on its side of the knee, its figure holds, and so does a large file's
    against the dense one."""
    files = {}
    for name, ch in (("dense", 32), ("reference", 8), ("small", 12), ("large", 24)):
        files[name] = export_onnx(_conv_net(ch), (1, ch, 8, 8), tmp_path / f"{name}.onnx").path
    weights = {n: prune_mod.layer_weights(p) for n, p in files.items()}
    assert weights["small"] < 4000 < weights["large"]
    true_ms = {n: 1e-4 * w for n, w in weights.items()}
    busy = {"on": False}

    def measure_many(device, paths, warmup, iters, repeats=1):
        for path in paths:
            name = next(n for n, p in files.items() if p == Path(path))
            slowed = 1.6 if busy["on"] and weights[name] > 4000 else 1.0
            yield _stats(true_ms[name] * slowed)

    monkeypatch.setattr(prune_mod.target, "measure_many", measure_many)
    dense_only = prune_mod.Timing(
        get_device("cpu"), 1, 5, files["dense"], reference_ms=true_ms["dense"]
    )
    ref = prune_mod.InCache(files["reference"], true_ms["reference"], 4000, 1152)
    by_side = replace(dense_only, in_cache=ref)
    for busy["on"] in (False, True):
        small = by_side.time(files["small"])
        assert small["paired_with"] == "in-cache"
        assert small["latency"]["median"] == pytest.approx(true_ms["small"])
        assert small["ratio_to_dense"] == pytest.approx(true_ms["small"] / true_ms["dense"])
        large = by_side.time(files["large"])
        assert large["paired_with"] == "dense"
        assert large["latency"]["median"] == pytest.approx(true_ms["large"])
        alone = dense_only.time(files["small"])
        assert alone["paired_with"] == "dense"
        read = alone["latency"]["median"] / true_ms["small"]
        assert read == pytest.approx(1 / 1.6 if busy["on"] else 1.0)


def test_the_in_cache_reference_is_the_largest_uniform_network_under_half_the_knee(tmp_path):
    shape = (1, 1, 16, 16)
    model = TinyNet(10, 1, 16).eval()
    groups = find_groups(model, shape)
    candidates = prune_mod.candidate_keeps(groups, (1.0, 0.75, 0.5, 0.25), 1)
    table = LatencyTable(get_device("cpu"), tmp_path / "t.sqlite", measure=lambda s: _stats(0.1))
    lat = prune_mod.LatencyModel(model, shape, groups, table)
    dense = lat.parts({g: max(c) for g, c in candidates.items()})[1]
    assert prune_mod.in_cache_keeps(lat, candidates, None) is None  # no knee
    assert prune_mod.in_cache_keeps(lat, candidates, dense) is None  # the dense one fits
    uniform = [{g: sorted(c, reverse=True)[i] for g, c in candidates.items()} for i in range(4)]
    w = [lat.parts(k)[1] for k in uniform]  # at keep ratios 1, 0.75, 0.5, 0.25
    assert prune_mod.in_cache_keeps(lat, candidates, 2 * w[2]) == uniform[2]
    assert prune_mod.in_cache_keeps(lat, candidates, 2 * w[2] - 1) == uniform[3]
    assert prune_mod.in_cache_keeps(lat, candidates, 8) is None  # nothing fits under 4


def test_unknown_timing_is_a_clear_error(tmp_path):
    with pytest.raises(DeepLSPError, match="--timing must be one of paired, absolute"):
        PruneConfig(model="m", dataset="d", out=str(tmp_path), keep_ratio=0.5, timing="x")


def test_budget_ratio_is_a_fraction_of_the_dense_latency_measured_in_the_run(
    tmp_path, tiny, fashionmnist_dir
):
    r = prune(
        _cfg(tmp_path, fashionmnist_dir, budget_ratio=0.5, finetune_epochs=0), log=lambda s: None
    )
    assert r["budget_ms"] == pytest.approx(0.5 * _dense_ms(r))
    assert r["budget_ratio"] == 0.5 and r["config"]["budget_ms"] is None
    assert r["pruned"]["latency_ms"]["median"] <= r["budget_ms"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert f"budget 0.5 x the dense model's measured latency = {r['budget_ms']:.3f} ms" in md


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"budget_ratio": 0.5, "budget_ms": 3.0}, "exactly one of --budget-ms, --budget-ratio"),
        ({}, "exactly one of"),
        ({"budget_ratio": 1.5}, r"--budget-ratio must be in \(0, 1\] \(got 1.5\)"),
        (
            {"budget_ratio": 0.5, "importance": "fisher"},
            r"--importance must be one of taylor, l1, l2 \(got 'fisher'\)",
        ),
    ],
)
def test_budget_settings_are_checked(tmp_path, kw, message):
    with pytest.raises(DeepLSPError, match=message):
        PruneConfig(model="m", dataset="d", out=str(tmp_path), **kw)


def _mac_knapsack(tmp_path):
    """TinyNet at 16x16 with four ratios, each group's loss linear in its cut, and a table
    whose layers time in proportion to their MACs (no rounding)."""
    from deeplsp.structure import find_groups
    from devices import DEVICES

    shape = (1, 1, 16, 16)
    model = TinyNet(10, 1, 16).eval()
    groups = find_groups(model, shape)
    candidates = prune_mod.candidate_keeps(groups, (1.0, 0.75, 0.5, 0.25), 1)
    sens = {g: {k: 1 - k / max(c) for k in c} for g, c in candidates.items()}

    def layer_ms(sig) -> float:
        if sig.kind == "linear":
            return 1e-4 * sig.in_channels * sig.out_channels
        h, w = sig.out_hw
        return 1e-4 * h * w * sig.out_channels * sig.in_channels / sig.groups

    table = LatencyTable(
        DEVICES.get("cpu"), tmp_path / "t.sqlite", measure=lambda s: _stats(layer_ms(s))
    )
    return model, shape, groups, candidates, sens, table


def test_coupled_allocation_reaches_past_the_full_width_bound(tmp_path):
    """Below the knapsack's full-width bound (every group at its smallest, inputs at full
    width) a budget can still fit networks larger than the smallest: they are found."""
    from deeplsp.allocation import InfeasibleBudget

    model, shape, groups, candidates, sens, table = _mac_knapsack(tmp_path)
    with table:
        lat = prune_mod.LatencyModel(model, shape, groups, table)
        smallest = {g: min(c) for g, c in candidates.items()}
        per, base = lat.options({g: max(c) for g, c in candidates.items()}, candidates)
        bound = base + sum(min(v.values()) for v in per.values())
        budget = 0.98 * bound
        assert lat.table_sum(smallest) < budget  # the case: fits coupled, not bounded
        keeps, cost = prune_mod.allocate_coupled(lat, candidates, sens, budget)
        assert lat.table_sum(keeps) <= budget
        assert keeps != smallest and cost < sum(sens[g][k] for g, k in smallest.items())
        with pytest.raises(InfeasibleBudget):
            prune_mod.allocate_coupled(lat, candidates, sens, 0.99 * lat.table_sum(smallest))


def test_coupled_allocation_charges_every_weight_and_spends_what_the_free_ones_leave(tmp_path):
    """Weights that cost only past the device's free ones are no cost per layer. Where
    the knapsack's answer with weights free fits under the knee, it is the answer: the
    table alone is its cost. Past it, the knapsack charges every weight, an upper bound,
    and the stretching spends what the free weights leave. Every answer fits the true
    sum, and the more weights are free, the less loss the answer has."""
    model, shape, groups, candidates, sens, table = _mac_knapsack(tmp_path)
    with table:
        lat = prune_mod.LatencyModel(model, shape, groups, table)
        full = {g: max(c) for g, c in candidates.items()}
        budget = 0.5 * lat.table_sum(full)
        free_of_cost = prune_mod.allocate_coupled(lat, candidates, sens, budget)
        unpriced_weights = lat.parts(free_of_cost[0])[1]
        lat.weight_cost = 4 * budget / lat.parts(full)[1]
        answers = []
        for free in (0, unpriced_weights // 2, unpriced_weights - 1, unpriced_weights, 10**9):
            lat.free_weights = free
            keeps, loss = prune_mod.allocate_coupled(lat, candidates, sens, budget)
            assert lat.table_sum(keeps) <= budget
            answers.append((keeps, loss))
        losses = [loss for _, loss in answers]
        assert losses[0] > losses[1] and losses == sorted(losses, reverse=True)
        # one weight past the knee, the unpriced answer is not taken; at the knee it is
        assert answers[2] != free_of_cost and losses[2] > free_of_cost[1]
        assert answers[3] == answers[4] == free_of_cost


def test_a_delivered_network_grows_step_by_step_up_to_the_goal(tmp_path):
    """Where the knapsack has no larger answer within the goal, the climb grows the
    delivered network one candidate step at a time, the step that removes the most loss
    per table ms first, until no step is predicted within the goal."""
    model, shape, groups, candidates, sens, table = _mac_knapsack(tmp_path)
    with table:
        lat = prune_mod.LatencyModel(model, shape, groups, table)
        selector = prune_mod.Selector(None, None, {}, lat, candidates, sens, {1.0: sens}, None)
        smallest = {g: min(c) for g, c in candidates.items()}
        full = {g: max(c) for g, c in candidates.items()}
        same = Calibration.fit([1.0, 2.0], [1.0, 2.0])  # predicts the table sum itself
        goal = (lat.table_sum(smallest) + lat.table_sum(full)) / 2
        out = prune_mod.grown(smallest, selector, lat, same, goal)
        assert out is not None and lat.table_sum(out) <= goal
        assert all(out[g] >= smallest[g] for g in out) and out != smallest
        for g, c in candidates.items():  # no further step fits
            up = min((k for k in c if k > out[g]), default=None)
            assert up is None or lat.table_sum({**out, g: up}) > goal
        # the first step: the most loss removed per table ms
        first = prune_mod.grown(smallest, selector, lat, same, lat.table_sum(smallest) * 1.0001)
        assert first is None  # nothing fits a goal the network already fills

        def rate(g):
            up = min(k for k in candidates[g] if k > smallest[g])
            trial = {**smallest, g: up}
            gain = selector.cost(smallest) - selector.cost(trial)
            return gain / (lat.table_sum(trial) - lat.table_sum(smallest))

        best = max(candidates, key=lambda g: (rate(g), g))
        step = min(k for k in candidates[best] if k > smallest[best])
        one = lat.table_sum({**smallest, best: step})
        assert prune_mod.grown(smallest, selector, lat, same, one) == {**smallest, best: step}


def test_coupled_allocation_holds_the_budget_when_narrow_inputs_time_slower(tmp_path):
    """Measured tables are not monotone in input width (a layer can run slower on a
    misaligned, narrower input): the full-width charge then under-states the network and
    the knapsack's first answer sums over the budget. The answer must still fit."""
    from deeplsp.allocation import allocate
    from deeplsp.structure import find_groups
    from devices import DEVICES

    shape = (1, 1, 16, 16)
    model = TinyNet(10, 1, 16).eval()
    groups = find_groups(model, shape)
    candidates = prune_mod.candidate_keeps(groups, (1.0, 0.75, 0.5, 0.25), 1)
    sens = {g: {k: 1 - k / max(c) for k in c} for g, c in candidates.items()}

    def layer_ms(sig) -> float:  # MACs, plus a penalty for inputs not a multiple of 8
        slow = 0.0 if sig.in_channels % 8 == 0 or sig.in_channels == 1 else 1.0
        if sig.kind == "linear":
            return 1e-4 * sig.in_channels * sig.out_channels + slow
        h, w = sig.out_hw
        return 1e-4 * h * w * sig.out_channels * sig.in_channels / sig.groups + slow

    table = LatencyTable(
        DEVICES.get("cpu"), tmp_path / "t.sqlite", measure=lambda s: _stats(layer_ms(s))
    )
    with table:
        lat = prune_mod.LatencyModel(model, shape, groups, table)
        full = {g: max(c) for g, c in candidates.items()}
        per, base = lat.options(full, candidates)
        opts = {
            g: [prune_mod.Option(k, sens[g][k], per[g][k]) for k in candidates[g]]
            for g in candidates
        }
        budget = 0.3 * lat.table_sum(full)
        naive = allocate(opts, budget, base).keeps()
        assert lat.table_sum(naive) > budget  # the case: the bound does not hold
        keeps, _ = prune_mod.allocate_coupled(lat, candidates, sens, budget)
        assert lat.table_sum(keeps) <= budget
        assert keeps != {g: min(c) for g, c in candidates.items()}


@pytest.fixture
def disagreeing(tmp_path):
    """A TinyNet whose two cost tables disagree on which group to cut (`sens` cuts
    features.3 cheaply, `other` features.6), on a synthetic latency table, with a one-batch
    adaptive-BN set: `make(tables, **kw)` opens the table and returns (LatencyModel, a
    Selector over `tables`, half the dense table sum)."""
    from contextlib import ExitStack

    from deeplsp.structure import channel_scores, find_groups, order_of
    from devices import DEVICES

    shape = (1, 1, 16, 16)
    torch.manual_seed(0)
    model = TinyNet(10, 1, 16).eval()
    groups = find_groups(model, shape)
    candidates = prune_mod.candidate_keeps(groups, (1.0, 0.75, 0.5, 0.25), 1)
    order = order_of(channel_scores(model, shape, "l1"))

    def cut(cheap):
        return {
            g: {k: (0.01 if g == cheap else 1.0) * (1 - k / max(c)) for k in c}
            for g, c in candidates.items()
        }

    data = ([(torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))],) * 2
    with ExitStack() as stack:

        def make(tables, **kw):
            table = stack.enter_context(
                LatencyTable(
                    DEVICES.get("cpu"),
                    tmp_path / "t.sqlite",
                    measure=lambda s: _stats(_layer_ms(s)),
                )
            )
            lat = prune_mod.LatencyModel(model, shape, groups, table)
            budget = 0.5 * lat.table_sum({g: max(c) for g, c in candidates.items()})
            sel = prune_mod.Selector(
                model, shape, order, lat, candidates, tables[1.0], tables, data, **kw
            )
            return lat, sel, budget

        yield SimpleNamespace(
            candidates=candidates, sens=cut("features.3"), other=cut("features.6"), make=make
        )


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_adaptive_bn_selection_leaves_the_knapsack_answer_only_for_a_clearly_lower_loss(
    disagreeing, monkeypatch, noise
):
    tables = {1.0: disagreeing.sens, 0.0: disagreeing.other}
    judged = []

    def fake_adapted_losses(net, adapt, held):
        """Favours a wide middle layer by 1/width on average; with `noise`, each image's
        loss also swings by +-width/4, so the paired gap (<= 0.19 here) sits within two
        standard errors (>= 0.25)."""
        width = net.features[3].out_channels
        judged.append(width)
        swing = torch.tensor([1.0, -1.0]).repeat(32) * noise * width / 4
        return 1.0 / width + swing

    monkeypatch.setattr(prune_mod, "adapted_losses", fake_adapted_losses)
    lat, sel, budget = disagreeing.make(tables)
    candidates = disagreeing.candidates
    answers = {
        b: prune_mod.allocate_coupled(lat, candidates, t, budget)[0] for b, t in tables.items()
    }
    assert answers[1.0]["features.3"] < answers[0.0]["features.3"]  # the case
    keeps, blend, line = sel.allocate(budget)
    assert line.startswith("adaptive-BN loss by blend 1: ")
    if noise:  # within the estimate's noise: the loss-increase knapsack's answer stands
        assert keeps == answers[1.0] and blend == "blend 1"
        assert line.endswith("none clearly below blend 1's, kept it")
    else:
        assert keeps == answers[0.0] and blend == "blend 0"
        gap = 1 / answers[1.0]["features.3"] - 1 / answers[0.0]["features.3"]
        assert f"chose 0, {gap:.3f} below blend 1's (standard error 0.000)" in line
    assert len(judged) == 2  # each answer judged once
    assert sel.score(keeps) == pytest.approx(1.0 / keeps["features.3"])


def test_a_budget_run_with_sensitivity_selection_reads_no_adaptive_bn_loss(
    tmp_path, tiny, fashionmnist_dir
):
    probe = prune(
        _cfg(tmp_path, fashionmnist_dir, budget_ms=1e6, finetune_epochs=0), log=lambda s: None
    )
    budget = 0.5 * _dense_ms(probe)
    lines = []
    r = prune(
        _cfg(
            tmp_path,
            fashionmnist_dir,
            budget_ms=budget,
            finetune_epochs=0,
            selection="sensitivity",
        ),
        log=lines.append,
    )
    assert r["pruned"]["latency_ms"]["median"] <= budget
    assert r["search"] and all(c["score"] is None for c in r["search"])
    assert not any("adaptive-BN" in line for line in lines)


@pytest.mark.parametrize("mode", ["context", "dense"])
def test_the_knapsack_reads_the_loss_in_context_around_the_uniform_network_near_the_budget(
    tmp_path, tiny, fashionmnist_dir, monkeypatch, mode
):
    probe = prune(
        _cfg(tmp_path, fashionmnist_dir, budget_ms=1e6, finetune_epochs=0), log=lambda s: None
    )
    budget = 0.5 * _dense_ms(probe)
    seen = []

    def fake_in_context(cache_dir, model, groups, order, candidates, context, adapt, held, imp):
        # cutting the middle group costs everything in context, the others nothing
        seen.append(dict(context))
        return {
            g: {k: (10.0 * (max(c) - k) if g == "features.3" else 0.0) for k in c}
            for g, c in candidates.items()
        }, False

    monkeypatch.setattr(prune_mod, "cached_in_context", fake_in_context)
    lines = []
    cfg = _cfg(
        tmp_path,
        fashionmnist_dir,
        budget_ms=budget,
        finetune_epochs=0,
        selection="sensitivity",
        sensitivity=mode,
    )
    r = prune(cfg, log=lines.append)
    keeps = {g["id"]: g["keep"] for g in r["groups"]}
    if mode == "dense":
        assert not seen and r["sensitivity"]["mode"] == "dense"
        return
    (context,) = seen
    info = r["sensitivity"]
    assert info["mode"] == "context" and info["ratio"] in cfg.ratios
    # the uniform network at that ratio, predicted within the search's aim
    assert context == info["context"]
    assert {g["id"]: round(g["channels"] * info["ratio"]) for g in r["groups"]} == context
    assert info["predicted_ms"] <= prune_mod._band(cfg)[2]
    assert keeps["features.3"] == 32 and min(keeps.values()) < 32
    assert any(line.startswith("sensitivity in context: every other group at") for line in lines)
    assert "Loss increase in context" in (tmp_path / "run" / "report.md").read_text()


def _rivalled(disagreeing):
    """The disagreeing case with the threshold rule as rival (its importance rising with
    the channel index, every count a candidate): (the rival's choices and scores, lat, the
    selector, the table budget, the rule's answer, the loss-increase knapsack's answer)."""
    scores = {g: torch.linspace(0.5, 1.5, max(c)) for g, c in disagreeing.candidates.items()}
    every = {g: list(range(1, max(c) + 1)) for g, c in disagreeing.candidates.items()}
    lat, sel, budget = disagreeing.make({1.0: disagreeing.sens}, rival=(every, scores))
    rule = prune_mod.allocate_threshold(every, scores, lambda k: lat.table_sum(k) <= budget)
    own = prune_mod.allocate_coupled(lat, disagreeing.candidates, disagreeing.sens, budget)[0]
    return (every, scores), lat, sel, budget, rule, own


@pytest.mark.parametrize("favoured", [True, False])
def test_the_threshold_rules_answer_is_judged_beside_the_knapsacks(
    disagreeing, monkeypatch, favoured
):
    """The rival (global importance threshold over every count, aimed at the same table
    budget) replaces the loss-increase knapsack's answer only when its adaptive-BN loss is
    clearly lower, as any blend's would."""
    choices, lat, sel, budget, rival, own = _rivalled(disagreeing)
    assert rival is not None and rival != own  # the case

    def fake_adapted_losses(net, adapt, held):
        is_rival = net.features[3].out_channels == rival["features.3"]
        return torch.full((64,), 1.0 if is_rival == favoured else 2.0)

    monkeypatch.setattr(prune_mod, "adapted_losses", fake_adapted_losses)
    keeps, name, line = sel.allocate(budget)
    assert line.startswith("adaptive-BN loss by blend 1: ") and ", threshold: " in line
    if favoured:
        assert keeps == rival and name == "threshold"
        assert "chose threshold, 1.000 below blend 1's" in line
    else:
        assert keeps == own and name == "blend 1"
    assert lat.table_sum(keeps) <= budget
    # without a judge there is no rival: the knapsack's answer alone
    _, plain, _ = disagreeing.make({1.0: disagreeing.sens}, rival=choices)
    plain.abn_data = None
    assert plain.allocate(budget) == (own, "blend 1", "")


def test_the_knapsack_held_near_the_threshold_rules_counts_is_judged_too(disagreeing, monkeypatch):
    """Beside the rule's answer, the loss-increase knapsack with every group held to at
    least TRUST_FLOOR of the rule's count: it fits the same table budget, differs from
    both, and is chosen when its adaptive-BN loss is the lowest of those clearly lower.
    (A floor of a half: TinyNet's four candidates per group leave no trade at 0.75.)"""
    monkeypatch.setattr(prune_mod, "TRUST_FLOOR", 0.5)
    (every, _), lat, sel, budget, rule, own = _rivalled(disagreeing)
    held = prune_mod.allocate_floored(lat, disagreeing.candidates, disagreeing.sens, rule, budget)
    assert lat.table_sum(held) <= budget
    assert all(held[g] >= prune_mod.TRUST_FLOOR * rule[g] for g in rule)
    assert all(held[g] in disagreeing.candidates[g] or held[g] == rule[g] for g in held)
    # the unheld knapsack cuts its cheap group below the floor; the held one may not
    assert own["features.3"] < prune_mod.TRUST_FLOOR * rule["features.3"]
    assert len({tuple(sorted(k.items())) for k in (own, rule, held)}) == 3  # the case
    # it traded from the rule's answer toward a lower summed loss
    assert prune_mod.summed_loss(disagreeing.sens, held) < prune_mod.summed_loss(
        disagreeing.sens, rule
    )
    losses = {
        tuple(sorted(own.items())): 2.0,
        tuple(sorted(rule.items())): 1.5,
        tuple(sorted(held.items())): 1.4,
    }

    def fake_adapted_losses(net, adapt, held_out):
        keeps = {g: net.get_submodule(g).out_channels for g in own}
        return torch.full((64,), losses[tuple(sorted(keeps.items()))])

    monkeypatch.setattr(prune_mod, "adapted_losses", fake_adapted_losses)
    keeps, name, line = sel.allocate(budget)
    assert keeps == held and name == "blend 1 floored"
    assert ", threshold: 1.500, 1 floored: 1.400; chose 1 floored, 0.600 below" in line
    # no room to trade (the floor at the rule's counts and no candidate above them but the
    # widest): the rule's answer itself
    assert prune_mod.allocate_floored(lat, every, disagreeing.sens, rule, budget, 1.0) == rule


def test_loss_at_reads_a_skipped_count_between_the_measured_ones():
    table = {8: 0.0, 4: 1.0, 2: 3.0}
    assert prune_mod.loss_at(table, 4) == 1.0
    assert prune_mod.loss_at(table, 6) == pytest.approx(0.5)
    assert prune_mod.loss_at(table, 3) == pytest.approx(2.0)
    assert prune_mod.loss_at(table, 1) == 3.0  # under the narrowest: the narrowest's
    assert prune_mod.loss_at({}, 3) == 0.0
    assert prune_mod.summed_loss({"a": table, "b": {2: 1.0, 4: 0.0}}, {"a": 5, "b": 3}) == (
        pytest.approx(0.75 + 0.5)
    )


def test_short_finetune_selection_scores_each_answer_after_its_short_training(
    disagreeing, monkeypatch
):
    trained, judged = [], []

    def short(net):
        trained.append(net)
        net.features[3].weight.data.zero_()  # what the judge must see

    def fake_adapted_losses(net, adapt, held):
        judged.append(net)
        return torch.full((8,), float(net.features[3].weight.detach().abs().sum()))

    monkeypatch.setattr(prune_mod, "adapted_losses", fake_adapted_losses)
    tables = {1.0: disagreeing.sens, 0.5: disagreeing.other}
    _, sel, budget = disagreeing.make(tables, short=short)
    keeps, _, line = sel.allocate(budget)
    assert line.startswith("loss after a short fine-tune by blend 1: ")  # answers compared
    # every answer judged once, right after its own short training, and scored as trained
    assert len(trained) >= 2 and [id(n) for n in judged] == [id(n) for n in trained]
    assert float(sel.losses(keeps)[0]) == 0.0 and len(trained) == len(judged)


def test_a_budget_run_with_short_finetune_selection_reports_its_losses(
    tmp_path, tiny, fashionmnist_dir
):
    probe = prune(
        _cfg(tmp_path, fashionmnist_dir, budget_ms=1e6, finetune_epochs=0), log=lambda s: None
    )
    budget = 0.5 * _dense_ms(probe)
    cfg = _cfg(
        tmp_path,
        fashionmnist_dir,
        budget_ms=budget,
        finetune_epochs=0,
        selection="short-finetune",
        short_images=16,
    )
    r = prune(cfg, log=lambda s: None)
    assert r["pruned"]["latency_ms"]["median"] <= budget
    assert r["search"] and all(c["score"] is not None for c in r["search"])
    md = (tmp_path / "run" / "report.md").read_text()
    assert "loss after short fine-tune" in md and "adaptive-BN loss |" not in md


def test_cost_tables_blend_loss_with_removed_importance():
    sens = {"a": {4: 2.0, 2: 6.0}, "b": {4: 0.0, 2: 2.0}}
    scores = {"a": torch.tensor([1.0, 1.0, 1.0, 1.0]), "b": torch.tensor([0.1, 0.3, 1.6, 2.0])}
    candidates = {"a": [2, 4], "b": [2, 4]}
    t = prune_mod.cost_tables(sens, scores, candidates, (1.0, 0.5, 0.0))
    assert t[1.0] == {"a": {2: 0.75, 4: 0.25}, "b": {2: 0.25, 4: 0.0}}  # sens / (6 + 2)
    # removed importance: a's two weakest channels 2.0, b's 0.4; total 2.4
    assert t[0.0]["a"][2] == pytest.approx(2.0 / 2.4) and t[0.0]["b"][2] == pytest.approx(0.4 / 2.4)
    assert t[0.0]["a"][4] == 0.0
    assert t[0.5]["a"][2] == pytest.approx((0.75 + 2.0 / 2.4) / 2)


def test_the_search_stops_when_the_allocation_repeats_a_measured_candidate(
    tmp_path, tiny, fashionmnist_dir
):
    probe = prune(
        _cfg(tmp_path, fashionmnist_dir, budget_ms=1e6, finetune_epochs=0), log=lambda s: None
    )
    small_ms = probe["calibration"]["fit_points"][2][1]
    lines = []
    # Reachable, but not under the noise guard: the table can only offer the smallest
    # network, measured already, and nothing measured lies below the aim to step to.
    with pytest.raises(DeepLSPError, match=r"no candidate measured within .* in 0 iteration"):
        prune(
            _cfg(tmp_path, fashionmnist_dir, budget_ms=1.01 * small_ms, finetune_epochs=0),
            log=lines.append,
        )
    assert any("no candidate left between measured networks" in s for s in lines)


def test_a_budget_just_above_the_smallest_network_delivers_it(tmp_path, tiny, fashionmnist_dir):
    cfg = _cfg(tmp_path, fashionmnist_dir, budget_ms=1e6, finetune_epochs=0)
    small_ms = prune(cfg, log=lambda s: None)["calibration"]["fit_points"][2][1]
    # the aim (the band's middle) lies below the smallest network, which fits the goal
    r = prune(replace(cfg, budget_ms=small_ms / 0.9), log=lambda s: None)
    assert len(r["search"]) == 1 and r["pruned"]["latency_ms"]["median"] <= small_ms / 0.9
    assert [g["keep"] for g in r["groups"]] == [8, 8, 8]  # every group at 25% of 16 / 32


@pytest.fixture
def costly(monkeypatch):
    """Every channel removed costs loss (the tiny net's own sensitivities are mostly 0,
    which lets the knapsack choose anything)."""

    def sensitivity(cache_dir, model, groups, order, candidates, *rest, **kw):
        return {g: {k: 1 - k / max(c) for k in c} for g, c in candidates.items()}, False

    monkeypatch.setattr(prune_mod, "cached_sensitivity", sensitivity)
    monkeypatch.setattr(prune_mod, "cached_in_context", sensitivity)  # the same, in context


def test_a_misjudged_candidate_is_corrected_along_the_knapsacks_own_solutions(
    tmp_path, tiny, fashionmnist_dir, costly
):
    probe = prune(
        _cfg(tmp_path, fashionmnist_dir, budget_ms=1e6, finetune_epochs=0), log=lambda s: None
    )
    budget = 0.5 * _dense_ms(probe)
    # the search's own mechanics, on the loss-increase knapsack's family alone (no judge:
    # no blends, no threshold rival)
    cfg = _cfg(
        tmp_path, fashionmnist_dir, budget_ms=budget, finetune_epochs=0, selection="sensitivity"
    )
    clean = prune(cfg, log=lambda s: None)["search"][0]["measured"]["latency"]["median"]
    # a cliff the table cannot see, just where the first candidate lies: it runs 20% over
    mmacs = clean - 0.05  # the fake clock: 0.05 ms + 1 ms per million MACs
    tiny["bump"] = (mmacs - 0.005, mmacs + 0.005, 1.2 * budget / clean)
    lines = []
    r = prune(cfg, log=lines.append)
    first, second = r["search"][:2]
    assert first["measured"]["latency"]["median"] > 1.1 * first["predicted_ms"]  # misjudged
    # the second is predicted through the knapsack solutions measured (and the two ends),
    # no longer through the uniform middle network the calibration started from
    (dense_sum, dense_ms), _, (small_sum, small_ms), *_ = r["calibration"]["fit_points"]
    family = Calibration.fit(
        [dense_sum, small_sum, first["table_ms"]],
        [dense_ms, small_ms, first["measured"]["latency"]["median"]],
    )
    # the knapsack again, not a step between the measured networks
    assert "between" not in second["note"]
    assert not any(s.startswith("iteration 2:") and "stepping between" in s for s in lines)
    # the family curve then undershoots twice (the cliff bent it): a step between follows
    assert any("missed twice on one side; stepping between" in s for s in lines)
    assert second["predicted_ms"] == pytest.approx(family.predict(second["table_ms"]))
    assert r["pruned"]["latency_ms"]["median"] <= budget


def test_a_step_between_networks_lands_where_their_latencies_meet_the_aim():
    candidates = {"a": [8, 16, 24, 32, 40, 48, 56, 64], "b": [8, 16], "c": [8, 16]}
    sens = {"a": {}, "b": {8: 1.0, 16: 0.0}, "c": {8: 0.1, 16: 0.0}}
    slow = ({"a": 64, "b": 16, "c": 16}, 10.0)
    fast = ({"a": 8, "b": 8, "c": 8}, 2.0)
    near_fast = prune_mod._between(slow, fast, 2.5, candidates, sens)
    middle = prune_mod._between(slow, fast, math.sqrt(20.0), candidates, sens)
    near_slow = prune_mod._between(slow, fast, 9.0, candidates, sens)
    # the middle half of the way: counts strictly between, ordered by the aim
    assert 8 < near_fast["a"] < middle["a"] < near_slow["a"] < 64
    assert middle["a"] in (16, 24)  # geometric middle of 8 and 64 is 22.6
    # groups with no count between them: the share that the aim asks for takes the slow
    # network's count, the group whose loss falls most first
    assert (near_fast["b"], near_fast["c"]) == (8, 8)
    assert (middle["b"], middle["c"]) == (16, 8)
    assert (near_slow["b"], near_slow["c"]) == (16, 16)


def test_the_delivered_model_is_timed_three_times_and_the_median_counts(
    tmp_path, tiny, fashionmnist_dir
):
    probe = prune(
        _cfg(tmp_path, fashionmnist_dir, budget_ms=1e6, finetune_epochs=0), log=lambda s: None
    )
    cfg = _cfg(tmp_path, fashionmnist_dir, budget_ms=0.6 * _dense_ms(probe), finetune_epochs=0)
    tiny["log"].clear()
    clean = prune(cfg, log=lambda s: None)["pruned"]
    timings = len(tiny["log"])  # the delivered model's three come last
    tiny["log"].clear()
    tiny["outliers"] = {timings - 2: 1.5}  # its first timing 50% slow
    noisy = prune(cfg, log=lambda s: None)
    ms = clean["latency_ms"]["median"]
    assert noisy["pruned"]["timings_ms"] == pytest.approx([1.5 * ms, ms, ms])
    assert noisy["pruned"]["latency_ms"]["median"] == pytest.approx(ms)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "median of its timings" in md


def test_finetune_is_one_reproducible_routine(tmp_path, fashionmnist_dir):
    """The bench fine-tunes its baselines with `finetune` and DeepLSP's config: the same
    config must give the same weights, with the masks held and the weights moved."""
    cfg = _cfg(tmp_path, fashionmnist_dir, keep_ratio=0.5, finetune_epochs=1)
    torch.manual_seed(0)
    dense = TinyNet(10, 1, 32).eval()
    start = TinyNet(10, 1, 32)
    masks = prune_mod.magnitude_masks(start, {"features.3": 0.5})
    runs = []
    for _ in range(2):
        model = copy.deepcopy(start)
        torch.manual_seed(123)  # a different global seed each time must not matter
        torch.rand(1)
        prune_mod.finetune(model, dense, masks, cfg)
        runs.append(model.state_dict())
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name]), name
    assert not torch.equal(runs[0]["features.0.weight"], start.state_dict()["features.0.weight"])
    assert torch.equal(runs[0]["features.3.weight"] == 0, masks["features.3"] == 0)


def test_threshold_allocation_keeps_what_clears_one_global_threshold():
    scores = {
        "a": torch.tensor([0.1, 0.5, 1.2, 2.2]),
        "b": torch.tensor([0.3, 0.9, 1.0, 1.8]),
        "c": torch.tensor([1.0, 1.0, 1.0, 1.0]),
    }
    cands = {"a": [1, 2, 3, 4], "b": [2, 4], "c": [1, 2, 3, 4]}
    at_most = lambda n: lambda keeps: sum(keeps.values()) <= n  # noqa: E731
    # thresholds 0.9 -> a 2, b 3 rounded up to 4, c 4 (10 channels); 1.0 -> 2 + 2 + 4 = 8
    assert prune_mod.allocate_threshold(cands, scores, at_most(8)) == {"a": 2, "b": 2, "c": 4}
    # 9: b's next channel (0.9) needs b at 4, over; a's next (0.5) fits as its third channel
    assert prune_mod.allocate_threshold(cands, scores, at_most(9)) == {"a": 3, "b": 2, "c": 4}
    assert prune_mod.allocate_threshold(cands, scores, at_most(12)) == {"a": 4, "b": 4, "c": 4}
    # above every score: each group at its smallest candidate (1 + 2 + 1)
    assert prune_mod.allocate_threshold(cands, scores, at_most(4)) == {"a": 1, "b": 2, "c": 1}
    assert prune_mod.allocate_threshold(cands, scores, at_most(3)) is None
    # 5: threshold 1.2 (a 2, b 1 rounded up to 2, c 0 up to 1) and no next count fits;
    # 6: c's first channel under it (1.0) takes c to 2, then nothing more fits
    assert prune_mod.allocate_threshold(cands, scores, at_most(5)) == {"a": 2, "b": 2, "c": 1}
    assert prune_mod.allocate_threshold(cands, scores, at_most(6)) == {"a": 2, "b": 2, "c": 2}


@pytest.mark.parametrize("mode", ["budget", "keep_ratio"])
def test_threshold_allocation_runs_end_to_end(tmp_path, tiny, fashionmnist_dir, mode):
    kw = dict(finetune_epochs=0, allocation="threshold")
    if mode == "budget":
        probe = prune(_cfg(tmp_path, fashionmnist_dir, budget_ms=1e6, **kw), log=lambda s: None)
        kw["budget_ms"] = budget = 0.5 * _dense_ms(probe)
    else:
        kw["keep_ratio"] = 0.5
    r = prune(_cfg(tmp_path, fashionmnist_dir, **kw), log=lambda s: None)
    keeps = {g["id"]: g["keep"] for g in r["groups"]}
    if mode == "budget":
        assert r["pruned"]["latency_ms"]["median"] <= budget
    else:
        assert sum(keeps.values()) <= 0.5 * sum(g["channels"] for g in r["groups"])
        assert "importance threshold" in r["status"]
    assert min(keeps[g["id"]] / g["channels"] for g in r["groups"]) < 1.0
    assert r["config"]["allocation"] == "threshold"


def test_the_threshold_rule_chooses_among_every_multiple_of_the_channel_multiple(
    tmp_path, tiny, fashionmnist_dir
):
    """The knapsack chooses among the scanned ratios (here 100% and 50%); the threshold rule
    among every multiple of 8, so it reaches a budget below the knapsack's smallest network."""
    assert prune_mod.every_multiple(find_groups(TinyNet(10, 1, 32), (1, 1, 32, 32)), 8) == {
        "features.0": [8, 16],
        "features.3": [8, 16, 24, 32],
        "features.6": [8, 16, 24, 32],
    }

    def clock(keeps):  # the tiny fixture's clock for that network
        net = prune_groups(TinyNet(10, 1, 32), (1, 1, 32, 32), keeps)
        return 0.05 + 1e-6 * count_torch(net, (1, 1, 32, 32)).macs

    halves = clock({"features.0": 8, "features.3": 16, "features.6": 16})
    eights = clock({"features.0": 8, "features.3": 8, "features.6": 8})
    budget = eights / 0.9
    assert budget < halves  # out of the knapsack's reach
    kw = dict(ratios=(1.0, 0.5), finetune_epochs=0, budget_ms=budget)
    with pytest.raises(DeepLSPError, match="below the smallest reachable latency"):
        prune(_cfg(tmp_path, fashionmnist_dir, **kw), log=lambda s: None)
    r = prune(_cfg(tmp_path, fashionmnist_dir, allocation="threshold", **kw), log=lambda s: None)
    assert r["pruned"]["latency_ms"]["median"] <= budget
    assert {g["id"]: g["keep"] for g in r["groups"]}["features.3"] == 8
    # 8 of 32 channels was never scanned: no loss increase to report, and none made up
    assert {g["id"]: g["sensitivity"] for g in r["groups"]}["features.3"] is None
    md = (tmp_path / "run" / "report.md").read_text()
    assert re.search(r"\| features\.3 +\| +32 \| +8 \| +0\.25 \| - ", md)
    assert "importance removed" in md


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"allocation": "greedy"}, r"--allocation must be one of knapsack, threshold"),
        (
            {"allocation": "threshold", "selection": "adaptive-bn"},
            "adaptive-bn chooses among knapsack answers",
        ),
    ],
)
def test_allocation_settings_are_checked(tmp_path, kw, message):
    with pytest.raises(DeepLSPError, match=message):
        PruneConfig(model="m", dataset="d", out=str(tmp_path), budget_ratio=0.5, **kw)


@pytest.mark.parametrize(
    "kw, selection",
    [
        ({}, "adaptive-bn"),  # the knapsack's answers are checked against a collapse
        ({"allocation": "threshold"}, "sensitivity"),  # one answer per budget
        ({"selection": "sensitivity"}, "sensitivity"),
    ],
)
def test_the_selection_defaults_to_adaptive_bn_for_the_knapsack(tmp_path, kw, selection):
    cfg = PruneConfig(model="m", dataset="d", out=str(tmp_path), budget_ratio=0.5, **kw)
    assert cfg.selection == selection
    assert PruneConfig.from_dict(cfg.to_dict()).selection == selection  # a report repeats it


def test_a_timing_the_search_could_accept_is_never_trusted_alone(tmp_path):
    cfg = PruneConfig(model="m", dataset="d", out=str(tmp_path), budget_ms=1.0)
    assert prune_mod._doubtful(0.85, 0.85, cfg)  # in the band, as predicted: timed again
    assert prune_mod._doubtful(0.50, 0.52, cfg)  # well under: it could still be accepted
    assert prune_mod._doubtful(1.08, 1.08, cfg)  # a near miss
    assert not prune_mod._doubtful(1.30, 1.25, cfg)  # clearly over, as predicted
    assert prune_mod._doubtful(1.30, 0.90, cfg)  # far off its prediction


def test_threads_set_the_devices_onnx_runtime_threads(tmp_path, tiny, fashionmnist_dir):
    cfg = _cfg(tmp_path, fashionmnist_dir, keep_ratio=0.6, finetune_epochs=0, threads=1)
    r = prune(cfg, log=lambda s: None)
    assert r["fingerprint"]["cores"] == 1 and r["config"]["threads"] == 1
    # another thread count is another device: its own fingerprint, so its own table rows
    other = prune(replace(cfg, threads=2), log=lambda s: None)
    assert other["fingerprint"]["id"] != r["fingerprint"]["id"]


def test_threads_are_checked(tmp_path, monkeypatch):
    with pytest.raises(DeepLSPError, match=r"--threads must be >= 1 \(got 0\)"):
        PruneConfig(model="m", dataset="d", out=str(tmp_path), keep_ratio=0.5, threads=0)
    monkeypatch.setattr(prune_mod, "resolve_device", lambda name, url: get_device("gpu"))
    cfg = PruneConfig(model="resnet18", dataset="fashionmnist", out=str(tmp_path), budget_ms=5,
                      device="gpu", threads=1)  # fmt: skip
    with pytest.raises(DeepLSPError, match="--threads sets ONNX Runtime's threads; device 'gpu' "):
        prune(cfg, log=lambda s: None)


def test_the_search_verdict_says_why_a_network_under_the_band_was_kept():
    """Under the band with a network in it measured too: kept for its lower loss, and the
    verdict says so instead of asking for more iterations; alone under it: it asks."""
    cfg = PruneConfig(model="resnet18", dataset="fashionmnist", out="x", budget_ms=10.0)
    floor_ms, goal_ms = 8.5, 9.4

    def cand(ms: float) -> prune_mod.Candidate:
        return prune_mod.Candidate({}, 1.0, ms, measured={"latency": {"median": ms}})

    fast, in_band, over = cand(7.0), cand(9.0), cand(9.9)
    kept = prune_mod._search_status(fast, [fast, over, in_band], floor_ms, goal_ms, cfg)
    assert kept.startswith("search: measured 7.000 ms <= 9.400 ms")
    assert "under the band (70% of the budget), kept over 1 network(s) measured in it" in kept
    assert "max-iterations" not in kept
    alone = prune_mod._search_status(fast, [fast, over], floor_ms, goal_ms, cfg)
    assert "WELL UNDER the budget (70% of it)" in alone and "--max-iterations" in alone
    assert "under" not in prune_mod._search_status(in_band, [fast, in_band], 8.5, 9.4, cfg)


def test_a_measured_network_is_preferred_by_its_cost_unless_adaptive_bn_clearly_disagrees():
    sens = {"a": {8: 1.0, 16: 0.0}, "b": {8: 0.5, 16: 0.0}}
    small, large = {"a": 8, "b": 16}, {"a": 16, "b": 8}  # costs 1.0 and 0.5
    swing = torch.tensor([1.0, -1.0]).repeat(32)

    def selector(loss_small: torch.Tensor, loss_large: torch.Tensor) -> prune_mod.Selector:
        sel = prune_mod.Selector(None, None, {}, None, {}, sens, {1.0: sens}, ([], []))
        sel._losses = {tuple(sorted(small.items())): loss_small}
        sel._losses[tuple(sorted(large.items()))] = loss_large
        return sel

    # adaptive-BN's mean favours the smaller network, within its noise: the cost decides
    noisy = selector(torch.full((64,), 2.0) + 0.5 * swing, torch.full((64,), 2.05) - 0.5 * swing)
    assert noisy.score(small) < noisy.score(large)
    assert noisy.better(large, small) and not noisy.better(small, large)
    # a clear adaptive-BN gap overrides the cost, either way round
    clear = selector(torch.full((64,), 1.5), torch.full((64,), 2.0))
    assert clear.better(small, large) and not clear.better(large, small)
    # without adaptive-BN (--selection sensitivity) the cost alone
    plain = prune_mod.Selector(None, None, {}, None, {}, sens, {1.0: sens}, None)
    assert plain.better(large, small) and not plain.better(small, large)


def _climbing(tmp_path, data) -> tuple[PruneConfig, float]:
    """A run at 60% of the dense latency on the loss-increase knapsack's family alone (no
    judge), to watch the climb's mechanics; and its goal (the budget less the guard)."""
    probe = prune(_cfg(tmp_path, data, budget_ms=1e6, finetune_epochs=0), log=lambda s: None)
    budget = 0.6 * _dense_ms(probe)
    cfg = _cfg(tmp_path, data, budget_ms=budget, finetune_epochs=0, selection="sensitivity")
    return cfg, (1 - 0.06) * budget


def test_after_the_search_larger_answers_are_measured_up_to_the_goal(
    tmp_path, tiny, fashionmnist_dir, costly
):
    cfg, goal = _climbing(tmp_path, fashionmnist_dir)
    budget = cfg.budget_ms
    plain = prune(replace(cfg, climb=0), log=lambda s: None)
    climbed = prune(cfg, log=lambda s: None)

    def delivered(r):
        return {g["id"]: g["keep"] for g in r["groups"]}

    def ms(c):
        return c["measured"]["latency"]["median"]

    # the search alone stops at its first network in the band; the climb measures the
    # knapsack's next larger answer, within the goal, and delivers it for its lower cost
    (first,) = plain["search"]
    assert climbed["search"][0]["keeps"] == first["keeps"] and ms(climbed["search"][0]) == ms(first)
    assert ms(first) < goal
    up = climbed["search"][1]
    assert up["note"] == "iteration 2 (climb)"
    assert ms(first) < ms(up) <= goal and up["cost"] < first["cost"]
    assert delivered(plain) == first["keeps"] and delivered(climbed) == up["keeps"]
    md = (tmp_path / "run" / "report.md").read_text()
    (row,) = [ln for ln in md.splitlines() if ln.startswith("| iteration 2 (climb")]
    assert row.rstrip(" |").endswith("yes") and "measured after the search" in md
    assert len(climbed["search"]) <= 1 + cfg.climb
    # the same larger answer measured over the goal (a slowdown the table cannot see):
    # measured, not delivered
    mmacs = ms(up) - 0.05  # the fake clock: 0.05 ms + 1 ms per million MACs
    tiny["bump"] = (mmacs - 0.001, mmacs + 0.001, 1.1 * budget / ms(up))
    lines = []
    over = prune(cfg, log=lines.append)
    assert over["search"][1]["keeps"] == up["keeps"] and ms(over["search"][1]) > goal
    assert delivered(over) == first["keeps"]
    assert any(s.startswith("iteration 2: climbing toward") and "over the goal" in s for s in lines)


def test_the_climb_grows_the_network_where_the_knapsack_has_no_larger_answer(
    tmp_path, tiny, fashionmnist_dir, costly, monkeypatch
):
    cfg, goal = _climbing(tmp_path, fashionmnist_dir)
    answers = []
    allocate = prune_mod.Selector.allocate

    def first_answer_only(self, table_budget):  # a family whose next answer is past the goal
        answers.append(allocate(self, table_budget))
        return answers[0]

    monkeypatch.setattr(prune_mod.Selector, "allocate", first_answer_only)
    lines = []
    r = prune(cfg, log=lines.append)
    first, up = r["search"][0], r["search"][1]
    assert any(
        s == "iteration 2: no larger knapsack answer; iteration 1 grown instead" for s in lines
    )
    assert up["note"] == "iteration 2 (climb, iteration 1 grown)"
    assert (
        all(up["keeps"][g] >= k for g, k in first["keeps"].items())
        and up["keeps"] != first["keeps"]
    )
    assert up["cost"] < first["cost"]
    ms = up["measured"]["latency"]["median"]
    delivered = {g["id"]: g["keep"] for g in r["groups"]}
    assert delivered == (up["keeps"] if ms <= goal else first["keeps"])
    assert len(r["search"]) <= 1 + cfg.climb
