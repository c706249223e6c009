"""HybridPruner: sensitivity-chosen channel ratios removed for real, then weight masks."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from baselines.hybrid_pruner import HybridConfig, HybridPruner, sensitivity_scan, silence
from deeplsp.errors import DeepLSPError
from deeplsp.methods import parse_overrides
from deeplsp.structure import (
    count_channels,
    find_groups,
    prune_groups,
    removal_order,
    round_channels,
)
from export import export_onnx


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_prunes_channels_and_weights(tiny_job, tmp_path):
    groups = find_groups(tiny_job.dense, tiny_job.shape)
    before = count_channels(tiny_job.dense, groups)
    out = HybridPruner().run(tiny_job, HybridConfig(max_drop=0.5))
    info = out.info
    assert out.structured and out.target_metric == "channel_reduction" and not out.exact
    assert out.target == info["channel_reduction"]
    assert 0 < out.target <= 0.5
    expected = {g: round_channels(c, 1 - info["group_ratios"][g]) for g, c in before.items()}
    assert out.channels == expected == count_channels(out.model, groups)
    assert out.target == pytest.approx(1 - sum(expected.values()) / sum(before.values()))
    assert _params(out.model) < _params(tiny_job.dense)
    # 20% of every remaining layer's weights are zero after fine-tuning
    for name, m in out.model.named_modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            assert (m.weight == 0).float().mean().item() == pytest.approx(0.2, abs=0.01), name
    assert info["weight_sparsity"] == pytest.approx(0.2, abs=0.01)
    r = export_onnx(out.model.eval(), tiny_job.shape, tmp_path / "m.onnx")
    assert r.max_abs_diff < 1e-3


def _fake_metrics(model, batches):
    """Accuracy falls with the share of zeroed weights: drops that grow with the ratio."""
    ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in ws)
    return 1 - zeros / sum(w.numel() for w in ws), 0.0


def test_tolerance_sets_the_ratios(tiny_job, monkeypatch):
    """Each group's ratio is the largest grid ratio before the first drop over max_drop."""
    monkeypatch.setattr("baselines.hybrid_pruner.val_metrics", _fake_metrics)
    model = tiny_job.dense
    groups = find_groups(model, tiny_job.shape)
    order = removal_order(model, tiny_job.shape)
    seen = set()
    for max_drop in (0.0, 0.03, 0.05, 0.99):
        cfg = HybridConfig(max_drop=max_drop)
        ratios, table = sensitivity_scan(model, groups, order, cfg, tiny_job.val)
        for g in groups:
            row = table[g.id]
            assert row["top1_drop"] == sorted(row["top1_drop"])
            ok = 0.0
            for r, drop in zip(row["ratio"], row["top1_drop"], strict=True):
                if drop > max_drop:
                    break
                ok = r
            assert ratios[g.id] == ok
        seen.add(tuple(ratios.values()))
        if max_drop == 0.0:
            assert set(ratios.values()) == {0.0}
        if max_drop == 0.99:
            assert set(ratios.values()) == {cfg.max_ratio}
    assert len(seen) == 4  # the tolerance changes the allocation
    assert len({r for ratios in seen for r in ratios}) > 3  # and groups differ


def test_silencing_matches_removal(tiny_job):
    """The scan's silenced channels give the same outputs as removing them."""
    model = copy.deepcopy(tiny_job.dense).eval()
    groups = find_groups(model, tiny_job.shape)
    order = removal_order(model, tiny_job.shape)
    images = tiny_job.val[0][0]
    for g in groups:
        silenced = copy.deepcopy(model)
        silence(silenced, g, order[g.id][: g.channels // 2])
        removed = prune_groups(copy.deepcopy(model), tiny_job.shape, {g.id: g.channels // 2})
        with torch.no_grad():
            assert torch.allclose(silenced(images), removed.eval()(images), atol=1e-5), g.id
            assert not torch.allclose(silenced(images), model(images), atol=1e-5), g.id


def test_no_training_keeps_masks_exact(tiny_job):
    tiny_job.train_cfg = dataclasses.replace(tiny_job.train_cfg, epochs=0)
    out = HybridPruner().run(tiny_job, parse_overrides(HybridConfig, ["weight_sparsity=0.5"]))
    assert out.info["weight_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_config_overrides_and_errors():
    cfg = parse_overrides(HybridConfig, ["max_drop=0.05", "max_ratio=0.3", "weight_sparsity=0"])
    assert (cfg.max_drop, cfg.max_ratio, cfg.weight_sparsity) == (0.05, 0.3, 0.0)
    assert cfg.grid() == [0.1, 0.2, 0.3]
    for bad in (
        ["max_drop=1"],
        ["max_ratio=0"],
        ["max_ratio=1"],
        ["step=0.6"],
        ["weight_sparsity=1"],
        ["max_drop=lots"],
    ):
        with pytest.raises(DeepLSPError):
            parse_overrides(HybridConfig, bad)
