"""WeightToNodePruning: probabilistic exact per-layer pruning, then dead-node removal."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from baselines.weight_to_node_pruning import Config, WeightToNodePruning, sample_prune
from deeplsp.errors import DeepLSPError
from deeplsp.masks import prunable_layers
from deeplsp.methods import METHODS, parse_overrides
from deeplsp.structure import prune_groups
from export import export_onnx
from tests.tiny_models import TinyResNet


def _epochs(job, epochs):
    return dataclasses.replace(job, train_cfg=dataclasses.replace(job.train_cfg, epochs=epochs))


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_exact_ratio_per_layer_kept_through_fine_tuning_and_onnx(tiny_job, tmp_path):
    out = WeightToNodePruning().run(tiny_job, Config())
    assert out.structured is False and out.target_metric == "sparsity" and out.target == 0.5
    assert out.info["nodes_removed"] == 0 and out.exact and out.channels is None
    dense = prunable_layers(tiny_job.dense)
    for name, m in prunable_layers(out.model).items():
        assert int((m.weight == 0).sum()) == round(0.5 * m.weight.numel()), name
        kept = m.weight != 0
        assert not torch.equal(m.weight[kept], dense[name].weight.detach()[kept]), name
    r = export_onnx(out.model.eval(), tiny_job.shape, tmp_path / "m.onnx")
    assert r.max_abs_diff is not None and r.max_abs_diff <= 1e-3


def test_small_weights_more_likely_pruned_but_not_a_hard_cut(tiny_job):
    job = _epochs(tiny_job, 0)
    zeros = {
        n: m.weight == 0
        for n, m in prunable_layers(WeightToNodePruning().run(job, Config()).model).items()
    }
    hard_cut = False
    for name, m in prunable_layers(tiny_job.dense).items():
        a = m.weight.detach().abs()
        assert a[zeros[name]].mean() < a[~zeros[name]].mean(), name
        hard_cut |= bool(a[zeros[name]].max() > a[~zeros[name]].min())
    assert hard_cut  # some pruned weight is larger than some kept one: sampled, not thresholded
    same = WeightToNodePruning().run(job, Config())
    other = WeightToNodePruning().run(dataclasses.replace(job, seed=1), Config())
    same_z = {n: m.weight == 0 for n, m in prunable_layers(same.model).items()}
    other_z = {n: m.weight == 0 for n, m in prunable_layers(other.model).items()}
    assert all(torch.equal(same_z[n], zeros[n]) for n in zeros)  # seeded
    assert any(not torch.equal(other_z[n], zeros[n]) for n in zeros)


def test_sampler_matches_multinomial_without_replacement():
    w = torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0, 0.2])
    p = torch.exp(-w / w.mean())
    draws, k = 4000, 2
    gen = torch.Generator().manual_seed(0)
    ours = torch.zeros(6)
    ref = torch.zeros(6)
    for _ in range(draws):
        ours[sample_prune(w, k, 1.0, gen)] += 1
        ref[torch.multinomial(p, k, replacement=False, generator=gen)] += 1
    assert torch.allclose(ours / draws, ref / draws, atol=0.04)
    assert ours[0] > ours[4] * 3  # the smallest weight is pruned far more often
    # a cold temperature is plain magnitude pruning
    cold = sample_prune(torch.arange(1.0, 11.0), 3, 0.01, gen)
    assert sorted(cold.tolist()) == [0, 1, 2]


def test_dead_nodes_removed_when_the_whole_group_is_dead(tiny_job, tmp_path):
    with torch.no_grad():
        d = tiny_job.dense
        d.conv1.weight[5] = 0  # conv1 is its own group: removable
        d.conv1.weight[9] = 0
        d.stem[0].weight[3] = 0  # stem and conv2 feed the same residual stream:
        d.conv2.weight[3] = 0  # channel 3 is dead in both, removable
        d.stem[0].weight[2] = 0  # dead in stem only: kept, counted as dead
    out = WeightToNodePruning().run(tiny_job, Config(temperature=0.05))
    assert out.info["nodes_removed"] == 3
    assert out.info["nodes_removed_by_group"] == {"stem.0": 1, "conv1": 2}
    assert out.info["dead_nodes_by_layer"].get("stem.0", 0) >= 1 and out.info["dead_nodes"] >= 1
    assert out.exact is False
    assert out.channels == {"stem.0": 15, "conv1": 14, "down.0": 32}
    m = out.model
    assert (m.conv1.out_channels, m.conv2.in_channels, m.bn1.num_features) == (14, 14, 14)
    assert (m.stem[0].out_channels, m.conv2.out_channels, m.down[0].in_channels) == (15, 15, 15)
    assert _params(m) < _params(tiny_job.dense)
    for name, share in out.info["per_layer_before_removal"].items():
        n = prunable_layers(tiny_job.dense)[name].weight.numel()
        assert share == round(0.5 * n) / n, name
    assert out.info["weights_removed"] > 0
    assert out.info["equivalent_sparsity"] > out.info["sparsity_before_removal"] - 1e-9
    # the dead stem channel stayed zero through fine-tuning
    assert bool((m.stem[0].weight.flatten(1) == 0).all(1).any())
    # the checkpoint rebuilds from `channels`
    rebuilt = prune_groups(TinyResNet(**tiny_job.build), tiny_job.shape, out.channels)
    rebuilt.load_state_dict(m.state_dict())
    r = export_onnx(m.eval(), tiny_job.shape, tmp_path / "m.onnx")
    assert r.max_abs_diff is not None and r.max_abs_diff <= 1e-3
    kept = WeightToNodePruning().run(
        _epochs(tiny_job, 0), Config(temperature=0.05, remove_nodes=False)
    )
    assert kept.info["nodes_removed"] == 0 and kept.info["dead_nodes"] >= 4


def test_config_overrides_and_errors():
    assert METHODS.get("WeightToNodePruning").kind == "unstructured"
    cfg = parse_overrides(Config, ["sparsity=0.3", "temperature=2.5", "remove_nodes=false"])
    assert (cfg.sparsity, cfg.temperature, cfg.remove_nodes) == (0.3, 2.5, False)
    assert Config() == Config(sparsity=0.5, temperature=1.0, remove_nodes=True)
    for bad in (["sparsity=1"], ["temperature=0"], ["temperature=-1"], ["remove_nodes=maybe"]):
        with pytest.raises(DeepLSPError):
            parse_overrides(Config, bad)
