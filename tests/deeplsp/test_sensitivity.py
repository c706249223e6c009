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


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large"])
def test_around_an_allocation_equals_removing_the_whole_network(name):
    """Measured around an allocation, a cut is the loss of the real network with every
    group at its allocated count and this one at the candidate, less the allocation's."""
    model = _trained_like(name)
    groups = find_groups(model, SHAPE)
    order = removal_order(model, SHAPE)
    batches = _batches()
    around = {g.id: max(1, g.channels // 2) for g in groups}
    cands = {g.id: [g.channels, around[g.id], max(1, g.channels // 4)] for g in groups}
    table = measure_sensitivity(model, groups, order, cands, batches, around=around)
    pruned = prune_groups(copy.deepcopy(model), SHAPE, around, order=order).eval()
    base = _loss(pruned, batches)
    assert base != pytest.approx(_loss(model, batches), abs=1e-3)  # the context matters
    for g in groups[:: max(1, len(groups) // 3)]:
        assert table[g.id][around[g.id]] == 0.0
        for k in (g.channels, max(1, g.channels // 4)):
            real = prune_groups(copy.deepcopy(model), SHAPE, {**around, g.id: k}, order=order)
            expected = _loss(real.eval(), batches) - base
            assert table[g.id][k] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # not clamped at zero: restoring a group's channels can lower the loss
    assert min(v for t in table.values() for v in t.values()) < 0


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
