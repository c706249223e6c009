"""Sensitivity: silencing channels measures exactly what removing them does, and is cached."""

import copy

import pytest
import torch

import deeplsp.sensitivity as sensitivity
from deeplsp.models import build_model
from deeplsp.sensitivity import _loss, cached_sensitivity, measure_sensitivity
from deeplsp.structure import find_groups, prune_groups, removal_order

SHAPE = (1, 1, 32, 32)


def _trained_like(name: str) -> torch.nn.Module:
    """Fresh weights, BN statistics from a few batches, and a classifier with real scale,
    so that silencing channels changes the loss."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=1, input_size=32)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(16, 1, 32, 32))
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.weight.mul_(50)
    return model.eval()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large"])
def test_silencing_equals_removal(name):
    model = _trained_like(name)
    groups = find_groups(model, SHAPE)
    order = removal_order(model, SHAPE)
    batches = _batches()
    base = _loss(model, batches)
    picked = groups[:: max(1, len(groups) // 4)]
    keeps = {g.id: max(1, g.channels // 4) for g in picked}
    table = measure_sensitivity(model, picked, order, {g: [k] for g, k in keeps.items()}, batches)
    changed = 0
    for g in picked:
        removed = prune_groups(copy.deepcopy(model), SHAPE, {g.id: keeps[g.id]}).eval()
        real = _loss(removed, batches) - base
        assert table[g.id][keeps[g.id]] == pytest.approx(max(0.0, real), rel=1e-4, abs=1e-5)
        assert table[g.id][g.channels] == 0.0
        changed += abs(real) > 1e-4
    assert changed >= 1  # the comparison is not only between zeros


def test_silencing_leaves_the_model_unchanged():
    model = _trained_like("resnet18")
    groups = find_groups(model, SHAPE)
    before = _loss(model, _batches())
    measure_sensitivity(
        model, groups[:2], removal_order(model, SHAPE), {g.id: [1] for g in groups[:2]}, _batches()
    )
    assert _loss(model, _batches()) == before


def test_cache_is_reused_and_keyed_by_weights(tmp_path, monkeypatch):
    model = _trained_like("resnet18")
    groups = find_groups(model, SHAPE)[:2]
    order = removal_order(model, SHAPE)
    cands = {g.id: [g.channels // 2, g.channels] for g in groups}
    first, cached = cached_sensitivity(tmp_path, model, groups, order, cands, _batches())
    assert not cached and set(first) == {g.id for g in groups}

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(sensitivity, "measure_sensitivity", boom)
    again, cached = cached_sensitivity(tmp_path, model, groups, order, cands, _batches())
    assert cached and again == first
    with torch.no_grad():
        model.conv1.weight.add_(1.0)
    with pytest.raises(AssertionError, match="recomputed"):
        cached_sensitivity(tmp_path, model, groups, order, cands, _batches())
