"""L1StructuredPruning: half the filters of every group go, the lowest-L1 ones, for real."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from baselines.l1_structured_pruning import L1StructuredConfig, L1StructuredPruning, filter_l1
from deeplsp.errors import DeepLSPError
from deeplsp.masks import sparsity
from deeplsp.methods import METHODS, parse_overrides
from deeplsp.structure import count_channels, find_groups
from export import export_onnx


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_filters_removed_for_real(tiny_job, tmp_path):
    groups = find_groups(tiny_job.dense, tiny_job.shape)
    before = count_channels(tiny_job.dense, groups)
    out = L1StructuredPruning().run(tiny_job, L1StructuredConfig())
    assert out.structured and out.target_metric == "channel_reduction" and out.exact
    assert out.target == 0.5
    assert out.channels == {g: c // 2 for g, c in before.items()}
    assert count_channels(out.model, groups) == out.channels
    assert out.info["channel_reduction"] == pytest.approx(0.5)
    assert _params(out.model) < 0.5 * _params(tiny_job.dense)
    r = export_onnx(out.model.eval(), tiny_job.shape, tmp_path / "m.onnx")
    assert r.max_abs_diff < 1e-3


def test_keeps_the_highest_l1_filters(tiny_job):
    """Without fine-tuning, the surviving stem filters are exactly the top-L1 ones."""
    tiny_job.train_cfg = dataclasses.replace(tiny_job.train_cfg, epochs=0)
    group = next(g for g in find_groups(tiny_job.dense, tiny_job.shape) if g.id == "stem.0")
    top = torch.argsort(filter_l1(tiny_job.dense, group), descending=True)[:8].sort().values
    out = L1StructuredPruning().run(tiny_job, L1StructuredConfig())
    dense_w = tiny_job.dense.stem[0].weight.detach()
    assert torch.equal(out.model.stem[0].weight.detach().cpu(), dense_w[top].cpu())


def test_fine_tunes_within_budget(tiny_job):
    tiny_job.train_cfg = dataclasses.replace(tiny_job.train_cfg, epochs=0)
    frozen = L1StructuredPruning().run(tiny_job, L1StructuredConfig()).model
    tiny_job.train_cfg = dataclasses.replace(tiny_job.train_cfg, epochs=1)
    tuned = L1StructuredPruning().run(tiny_job, L1StructuredConfig()).model
    assert not torch.equal(frozen.conv1.weight, tuned.conv1.weight.cpu())


def test_kernel_variant_zeroes_half_the_kernels(tiny_job, tmp_path):
    cfg = parse_overrides(L1StructuredConfig, ["variant=kernel"])
    out = L1StructuredPruning().run(tiny_job, cfg)
    assert not out.structured and out.target_metric == "sparsity"
    for name, m in out.model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            dead = (m.weight.detach().abs().sum((2, 3)) == 0).float().mean().item()
            assert dead == pytest.approx(0.5), name
    assert (out.model.fc.weight != 0).all()  # linear layers stay dense
    assert sparsity(out.model)["global"] == pytest.approx(out.target, abs=1e-6)
    assert _params(out.model) == _params(tiny_job.dense)
    r = export_onnx(out.model.eval(), tiny_job.shape, tmp_path / "m.onnx")
    assert r.max_abs_diff < 1e-3


def test_config_overrides_and_errors():
    cfg = parse_overrides(L1StructuredConfig, ["ratio=0.25", "variant=kernel"])
    assert cfg.ratio == 0.25 and cfg.variant == "kernel"
    assert METHODS.get("L1StructuredPruning").config(["ratio=0.3"]).ratio == 0.3
    for bad in (["ratio=1.0"], ["ratio=-0.1"], ["ratio=half"], ["variant=channel"], ["x=1"]):
        with pytest.raises(DeepLSPError):
            parse_overrides(L1StructuredConfig, bad)
