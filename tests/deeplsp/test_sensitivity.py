"""Sensitivity: silencing channels measures exactly what removing them does, alone and in
context, and is cached."""

import copy

import pytest
import torch

import deeplsp.sensitivity as sensitivity
from deeplsp.adaptive_bn import adapted_loss
from deeplsp.models import build_model
from deeplsp.sensitivity import (
    _loss,
    cached_in_context,
    cached_sensitivity,
    context_losses,
    measure_in_context,
    measure_sensitivity,
)
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


def _abn_batches():
    g = torch.Generator().manual_seed(2)
    return [
        [(torch.randn(8, 1, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))]
        for _ in range(2)
    ]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large"])
def test_in_context_silencing_equals_removal_with_batchnorm_reestimated(name):
    model = _trained_like(name)
    groups = find_groups(model, SHAPE)
    order = removal_order(model, SHAPE)
    adapt, held = _abn_batches()
    context = {g.id: max(1, g.channels // 2) for g in groups}
    picked = groups[:: max(1, len(groups) // 3)]
    cands = {g.id: [max(1, g.channels // 4), g.channels] for g in groups}
    losses = context_losses(model, groups, order, cands, context, adapt, held)
    for g in picked:
        for k in cands[g.id]:
            removed = prune_groups(copy.deepcopy(model), SHAPE, {**context, g.id: k}, order=order)
            real = adapted_loss(removed, adapt, held)
            assert losses[g.id][k] == pytest.approx(real, rel=1e-4, abs=1e-5), (g.id, k)
    # the context's cuts are undone: the model is as it was
    assert _loss(model, _batches()) == _loss(_trained_like(name), _batches())


def test_in_context_table_is_relative_to_full_width_and_never_cheaper_narrower(monkeypatch):
    model = _trained_like("resnet18")
    groups = find_groups(model, SHAPE)[:2]
    cands = {g.id: [8, 16, 32, g.channels] for g in groups}
    raw = {
        groups[0].id: {8: 2.5, 16: 2.1, 32: 2.3, 64: 2.0},
        groups[1].id: {8: 1.9, 16: 2.2, 32: 2.0, 64: 2.1},
    }
    monkeypatch.setattr(sensitivity, "context_losses", lambda *a: raw)
    table = measure_in_context(model, groups, {}, cands, {}, [], [])
    assert table[groups[0].id] == pytest.approx({64: 0.0, 32: 0.3, 16: 0.3, 8: 0.5})
    # a narrower count reading lower than the full width is noise: it costs nothing, not less
    assert table[groups[1].id] == pytest.approx({64: 0.0, 32: 0.0, 16: 0.1, 8: 0.1})


def test_in_context_cache_is_keyed_by_the_context(tmp_path, monkeypatch):
    model = _trained_like("resnet18")
    groups = find_groups(model, SHAPE)
    order = removal_order(model, SHAPE)
    cands = {g.id: [g.channels // 2, g.channels] for g in groups}
    adapt, held = _abn_batches()
    half = {g.id: g.channels // 2 for g in groups}
    first, cached = cached_in_context(tmp_path, model, groups, order, cands, half, adapt, held)
    assert not cached and all(first[g.id][g.channels] == 0.0 for g in groups)

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(sensitivity, "measure_in_context", boom)
    again, cached = cached_in_context(tmp_path, model, groups, order, cands, half, adapt, held)
    assert cached and again == first
    other = {**half, groups[0].id: groups[0].channels}
    with pytest.raises(AssertionError, match="recomputed"):
        cached_in_context(tmp_path, model, groups, order, cands, other, adapt, held)
