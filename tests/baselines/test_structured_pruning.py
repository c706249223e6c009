"""StructuredPruning: particle-filter search over channel, kernel and intra-kernel masks."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from baselines.structured_pruning import (
    StructuredPruning,
    StructuredPruningConfig,
    particle_search,
    perturb_drop,
    strided_pattern,
    zero_channels,
)
from deeplsp.errors import DeepLSPError
from deeplsp.methods import parse_overrides
from deeplsp.structure import count_channels, find_groups, remove_channels
from export import export_onnx

FAST = ["particles=4", "iterations=2"]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_channel_granularity_removes_half_for_real(tiny_job, tmp_path):
    groups = find_groups(tiny_job.dense, tiny_job.shape)
    before = count_channels(tiny_job.dense, groups)
    cfg = parse_overrides(StructuredPruningConfig, FAST)
    out = StructuredPruning().run(tiny_job, cfg)
    assert out.structured and out.target_metric == "channel_reduction" and out.exact
    assert out.channels == {g: c // 2 for g, c in before.items()}
    assert count_channels(out.model, groups) == out.channels
    assert out.info["channel_reduction"] == pytest.approx(0.5)
    assert _params(out.model) < 0.5 * _params(tiny_job.dense)
    errors = out.info["particle_errors"]
    assert len(errors) == 2 and all(len(e) == 4 for e in errors)
    assert out.info["best_val_error"] == min(min(e) for e in errors)
    assert out.info["best_val_error"] <= out.info["l1_candidate_val_error"]
    r = export_onnx(out.model.eval(), tiny_job.shape, tmp_path / "m.onnx")
    assert r.max_abs_diff < 1e-3


def test_channel_search_error_is_the_pruned_models_error(tiny_job):
    """Silencing channels during the search predicts the removed network exactly."""
    tiny_job.train_cfg = dataclasses.replace(tiny_job.train_cfg, epochs=0)
    out = StructuredPruning().run(tiny_job, parse_overrides(StructuredPruningConfig, FAST))
    model = out.model.eval()
    wrong = total = 0
    with torch.no_grad():
        for images, labels in tiny_job.val:
            wrong += int((model(images).argmax(1) != labels).sum())
            total += labels.numel()
    assert wrong / total == pytest.approx(out.info["best_val_error"])


def test_silenced_particle_is_the_removed_network(tiny_job):
    """Scoring a channel particle by zeroing gives the same logits as removing it."""
    model = copy.deepcopy(tiny_job.dense).eval()
    groups = find_groups(model, tiny_job.shape)
    gen = torch.Generator().manual_seed(1)
    drop = {g.id: torch.randperm(g.channels, generator=gen) < g.channels // 2 for g in groups}
    silenced = copy.deepcopy(model)
    zero_channels(silenced, groups, drop)
    removed = copy.deepcopy(model)
    remove_channels(removed, tiny_job.shape, {g: d.nonzero().flatten() for g, d in drop.items()})
    images = tiny_job.val[0][0]
    with torch.no_grad():
        assert torch.allclose(silenced(images), removed.eval()(images), atol=1e-5)
        assert not torch.allclose(silenced(images), model(images), atol=1e-3)


def test_kernel_granularity_keeps_its_zeros(tiny_job, tmp_path):
    cfg = parse_overrides(StructuredPruningConfig, [*FAST, "granularity=kernel"])
    out = StructuredPruning().run(tiny_job, cfg)
    assert not out.structured and out.target_metric == "sparsity" and out.exact
    zeros = total = 0
    for name, m in out.model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            dead = m.weight.detach().abs().sum((2, 3)) == 0
            assert dead.float().mean().item() == pytest.approx(0.5), name
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    assert zeros / total == pytest.approx(out.target, abs=1e-6)
    assert out.info["sparsity"] == pytest.approx(out.target, abs=1e-6)
    r = export_onnx(out.model.eval(), tiny_job.shape, tmp_path / "m.onnx")
    assert r.max_abs_diff < 1e-3


def test_intra_kernel_strided_pattern(tiny_job, tmp_path):
    cfg = parse_overrides(StructuredPruningConfig, [*FAST, "granularity=intra_kernel"])
    out = StructuredPruning().run(tiny_job, cfg)
    assert not out.structured and not out.exact and out.info["stride"] == 2
    offsets = out.info["offsets"]
    layers = {n: m for n, m in out.model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert set(offsets) == set(layers)  # every conv here is 3x3
    for name, off in offsets.items():
        w = layers[name].weight.detach()
        pattern = strided_pattern(3, 3, 2, off)
        assert (w[:, :, pattern == 0] == 0).all(), name  # pruned positions stay zero
        assert (w[:, :, pattern == 1] != 0).float().mean() > 0.9, name  # kept ones trained
    assert abs(out.info["sparsity"] - out.target) < 0.1  # 4 or 5 of 9 per kernel vs 1/2
    r = export_onnx(out.model.eval(), tiny_job.shape, tmp_path / "m.onnx")
    assert r.max_abs_diff < 1e-3


def test_particle_filter_improves_on_a_bad_candidate():
    """Error = share of the 'important' channels 0..3 that are pruned: the L1 candidate
    drops all four; resampling and perturbation must find a better mask."""
    scores = torch.arange(8.0)
    base = {"g": torch.tensor([True] * 4 + [False] * 4)}
    gen = torch.Generator().manual_seed(0)
    cfg = StructuredPruningConfig(particles=8, iterations=3)

    def perturb(p):
        return {"g": perturb_drop(p["g"], scores, cfg.perturb, gen)}

    def score(p):
        assert int(p["g"].sum()) == 4  # perturbation keeps the count
        return float(p["g"][:4].float().mean())

    best, err, history = particle_search(base, perturb, score, cfg, gen, lambda m: None)
    assert history[0][0] == 1.0 and len(history) == 3 and all(len(h) == 8 for h in history)
    assert err < 1.0 and err == score(best)


def test_config_overrides_and_errors():
    cfg = parse_overrides(
        StructuredPruningConfig, ["granularity=intra_kernel", "particles=2", "ratio=0.6"]
    )
    assert (cfg.granularity, cfg.particles, cfg.ratio) == ("intra_kernel", 2, 0.6)
    for bad in (
        ["granularity=filter"],
        ["particles=0"],
        ["iterations=0"],
        ["temperature=0"],
        ["perturb=0"],
        ["ratio=1"],
        ["granularity=intra_kernel", "ratio=0.2"],
    ):
        with pytest.raises(DeepLSPError):
            parse_overrides(StructuredPruningConfig, bad)
