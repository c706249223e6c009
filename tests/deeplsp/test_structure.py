"""Real channel removal on every registered model: coupled groups, valid outputs, rebuildable."""

import copy

import pytest
import torch
from torch import nn

from deeplsp.checkpoint import load_checkpoint, save_checkpoint
from deeplsp.errors import DeepLSPError
from deeplsp.models import MODELS, build_model
from deeplsp.structure import (
    count_channels,
    find_groups,
    layer_links,
    prune_groups,
    removal_order,
    round_channels,
)
from tests.tiny_models import TinyCNN

SHAPE = (1, 1, 32, 32)
BUILD = {"num_classes": 10, "in_channels": 1, "input_size": 32}


def _half(groups):
    return {g.id: max(1, g.channels // 2) for g in groups}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == "resnet50" else n for n in MODELS.names()],
)
def test_pruning_every_model_removes_channels_and_keeps_outputs_valid(name):
    torch.manual_seed(0)
    model = build_model(name, **BUILD).eval()
    groups = find_groups(model, SHAPE)
    assert len(groups) >= 10
    keep = _half(groups)
    pruned = prune_groups(copy.deepcopy(model), SHAPE, keep).eval()
    assert count_channels(pruned, groups) == keep
    params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in pruned.parameters()) < 0.35 * params  # ~1/4 by halving both dims
    with torch.no_grad():
        y = pruned(torch.randn(3, 1, 32, 32))
    assert y.shape == (3, 10) and torch.isfinite(y).all()
    # every conv reads exactly the channels its producer now emits (forward ran), and
    # the classifier still emits all classes
    assert [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1].out_features == 10


def test_residual_additions_are_one_group():
    groups = {g.id: g for g in find_groups(build_model("resnet18", **BUILD), SHAPE)}
    stem = groups["conv1"]  # the stem feeds layer1's residual stream
    assert {"layer1.0.conv2", "layer1.1.conv2"} <= set(stem.outputs)
    assert {"layer1.0.conv1", "layer1.1.conv1"} <= set(stem.inputs)
    assert "fc" not in groups


def test_mobilenet_depthwise_and_squeeze_excitation_are_coupled():
    model = build_model("mobilenet_v3_large", **BUILD)
    groups = {g.id: g for g in find_groups(model, SHAPE)}
    expand = groups["features.11.block.0.0"]
    # the depthwise conv, the SE excitation conv and the projection follow the expansion
    assert {"features.11.block.1.0", "features.11.block.2.fc2"} <= set(expand.outputs)
    assert {"features.11.block.2.fc1", "features.11.block.3.0"} <= set(expand.inputs)
    pruned = prune_groups(copy.deepcopy(model), SHAPE, {expand.id: 96})
    dw = dict(pruned.named_modules())["features.11.block.1.0"]
    assert (dw.in_channels, dw.out_channels, dw.groups) == (96, 96, 96)


def test_l1_keeps_the_largest_filters():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    with torch.no_grad():
        model.conv.weight.mul_(0.01)
        model.conv.weight[[1, 5]] = 1.0  # the two filters that matter
    kept_rows = model.conv.weight[[1, 5]].clone()
    prune_groups(model, (1, 3, 8, 8), {"conv": 2})
    assert model.conv.out_channels == 2 and model.bn.num_features == 2
    assert model.dw.in_channels == 2 and model.dw.groups == 2
    assert torch.equal(model.conv.weight, kept_rows)


def test_layer_links_name_the_groups_that_set_each_layer():
    model = TinyCNN()
    groups = find_groups(model, (1, 3, 8, 8))
    links = {lk.name: lk for lk in layer_links(model, groups)}
    assert links["conv"].in_group is None and links["conv"].out_group == "conv"
    assert links["dw"].in_group == "conv" and links["dw"].out_group == "conv"  # depthwise
    assert links["fc"].in_group == "conv" and links["fc"].out_group is None


@pytest.mark.parametrize(
    "channels, keep, multiple, expect",
    [
        (64, 0.5, 1, 32),
        (64, 0.5, 8, 32),
        (64, 0.3, 8, 16),
        (64, 0.01, 8, 8),
        (64, 1.0, 8, 64),
        (6, 0.5, 8, 6),
        (64, 20, 8, 16),
        (64, 99, 1, 64),
    ],
)
def test_round_channels(channels, keep, multiple, expect):
    assert round_channels(channels, keep, multiple) == expect


def test_bad_requests_are_clear_errors():
    model = TinyCNN()
    with pytest.raises(DeepLSPError, match="no prunable group named 'nope'"):
        prune_groups(model, (1, 3, 8, 8), {"nope": 2})
    with pytest.raises(DeepLSPError, match="keep must be in 1..8"):
        prune_groups(model, (1, 3, 8, 8), {"conv": 0})
    with pytest.raises(DeepLSPError, match="importance"):
        prune_groups(model, (1, 3, 8, 8), {"conv": 2}, importance="taylor2")


def test_pruned_checkpoint_rebuilds_the_pruned_architecture(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", **BUILD).eval()
    groups = find_groups(model, SHAPE)
    keep = _half(groups)
    prune_groups(model, SHAPE, keep)
    path = save_checkpoint(tmp_path / "p.pt", model, "resnet18", BUILD, channels=keep)
    rebuilt = load_checkpoint(path).build_model().eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def test_taylor_ranks_a_channel_nothing_reads_as_least_important():
    """A channel with the largest weights that the classifier ignores: magnitude keeps it
    longest, first-order Taylor (|w * dL/dw| on real batches) removes it first."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    with torch.no_grad():
        model[0].weight[0] *= 10
        model[4].weight[:, 0] = 0
    batches = [(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))) for _ in range(2)]
    shape = (1, 1, 6, 6)
    (gid,) = [g.id for g in find_groups(model, shape)]
    assert removal_order(model, shape, "l1")[gid][-1] == 0
    order = removal_order(model, shape, "taylor", batches)
    assert order[gid][0] == 0
    assert all(p.grad is None for p in model.parameters())  # the model's own grads untouched
    pruned = prune_groups(copy.deepcopy(model), shape, {gid: 3}, order=order)
    torch.testing.assert_close(pruned[0].weight, model[0].weight[1:])
    with pytest.raises(DeepLSPError, match="taylor importance needs calibration batches"):
        removal_order(model, shape, "taylor")
    with pytest.raises(DeepLSPError, match="choose from: taylor, l1, l2"):
        removal_order(model, shape, "l3")
