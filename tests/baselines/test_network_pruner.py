"""NetworkPruner (Han et al. 2015): iterative magnitude pruning with masked retraining."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from baselines.network_pruner import Config, NetworkPruner, schedule, split_epochs
from deeplsp.errors import DeepLSPError
from deeplsp.masks import magnitude_scores, masks_from_scores, prunable_layers
from deeplsp.methods import METHODS, parse_overrides
from export import export_onnx


def _epochs(job, epochs):
    return dataclasses.replace(job, train_cfg=dataclasses.replace(job.train_cfg, epochs=epochs))


def _zeros(model):
    return {n: (m.weight.detach() == 0) for n, m in prunable_layers(model).items()}


def test_exact_per_layer_sparsity_kept_through_retraining_and_onnx(tiny_job, tmp_path):
    job = _epochs(tiny_job, 3)
    out = NetworkPruner().run(job, Config())
    assert out.structured is False and out.target_metric == "sparsity" and out.exact
    dense = prunable_layers(job.dense)
    for name, m in prunable_layers(out.model).items():
        n = m.weight.numel()
        assert int((m.weight == 0).sum()) == round(0.5 * n), name
        kept = m.weight != 0
        # retrained: the surviving weights moved away from the dense ones
        assert not torch.equal(m.weight[kept], dense[name].weight.detach()[kept]), name
    assert out.info["epochs_per_round"] == [1, 1, 1]
    r = export_onnx(out.model.eval(), job.shape, tmp_path / "m.onnx")
    assert r.max_abs_diff is not None and r.max_abs_diff <= 1e-3


def test_rounds_prune_the_smallest_weights_nested(tiny_job):
    # Without retraining the three nested rounds end where one magnitude cut would.
    out = NetworkPruner().run(_epochs(tiny_job, 0), Config())
    expected = masks_from_scores(magnitude_scores(tiny_job.dense), 0.5, "layer")
    zeros = _zeros(out.model)
    for name, mask in expected.items():
        assert torch.equal(zeros[name], mask == 0), name
    assert out.info["schedule"] == pytest.approx([1 / 6, 1 / 3, 1 / 2])
    assert out.info["epochs_per_round"] == [0, 0, 0]
    for name, t in out.info["thresholds"].items():
        w = prunable_layers(out.model)[name].weight
        dense_w = prunable_layers(tiny_job.dense)[name].weight.detach().abs()
        assert dense_w[w != 0].min() >= t  # every kept weight is above the threshold
        assert out.info["quality"][name] > 0


def test_global_scope_exact_globally_not_per_layer(tiny_job):
    cfg = parse_overrides(Config, ["scope=global", "sparsity=0.6", "iterations=2"])
    out = NetworkPruner().run(_epochs(tiny_job, 0), cfg)
    expected = masks_from_scores(magnitude_scores(tiny_job.dense), 0.6, "global")
    zeros = _zeros(out.model)
    assert all(torch.equal(zeros[n], m == 0) for n, m in expected.items())
    total = sum(z.numel() for z in zeros.values())
    assert sum(int(z.sum()) for z in zeros.values()) == round(0.6 * total)
    per_layer = out.info["per_layer"].values()
    assert max(per_layer) - min(per_layer) > 0.01  # one threshold, uneven layers
    assert out.info["schedule"] == pytest.approx([0.3, 0.6])


def test_budget_split_over_rounds(tiny_job, monkeypatch):
    calls = []

    def fake_train(model, loader, cfg, hooks=None, desc=""):
        calls.append(cfg.epochs)
        assert hooks is not None and hooks.teacher is tiny_job.dense
        return {}

    monkeypatch.setattr("baselines.network_pruner.train", fake_train)
    NetworkPruner().run(_epochs(tiny_job, 5), Config())
    assert calls == [1, 2, 2]
    calls.clear()
    NetworkPruner().run(_epochs(tiny_job, 1), Config())
    assert calls == [1]  # fewer epochs than rounds: only the last round retrains
    assert split_epochs(7, 3) == [2, 2, 3] and split_epochs(0, 2) == [0, 0]
    assert schedule(0.9, 3) == pytest.approx([0.3, 0.6, 0.9])


def test_config_overrides_and_errors():
    assert METHODS.get("NetworkPruner").kind == "unstructured"
    cfg = parse_overrides(Config, ["sparsity=0.3", "iterations=5", "scope=global"])
    assert (cfg.sparsity, cfg.iterations, cfg.scope) == (0.3, 5, "global")
    assert Config() == Config(sparsity=0.5, iterations=3, scope="layer")
    for bad in (["sparsity=1.0"], ["sparsity=0"], ["iterations=0"], ["scope=row"], ["x=1"]):
        with pytest.raises(DeepLSPError):
            parse_overrides(Config, bad)
