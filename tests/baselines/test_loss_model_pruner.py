"""LossModelPruner: Taylor / magnitude / random importance, one global cut, masked fine-tuning."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from baselines.loss_model_pruner import Config, LossModelPruner, taylor_scores
from deeplsp.errors import DeepLSPError
from deeplsp.masks import magnitude_scores, masks_from_scores, prunable_layers
from deeplsp.methods import METHODS, parse_overrides
from export import export_onnx


def _epochs(job, epochs):
    return dataclasses.replace(job, train_cfg=dataclasses.replace(job.train_cfg, epochs=epochs))


def _zeros(model):
    return {n: (m.weight.detach() == 0) for n, m in prunable_layers(model).items()}


def test_taylor_scores_are_abs_weight_times_gradient(tiny_job):
    model = copy.deepcopy(tiny_job.dense).eval()
    images, labels = tiny_job.calib[0]
    nn.functional.cross_entropy(model(images), labels).backward()
    scores = taylor_scores(copy.deepcopy(tiny_job.dense), tiny_job.calib[:1], torch.device("cpu"))
    for name, m in prunable_layers(model).items():
        torch.testing.assert_close(scores[name], (m.weight.detach() * m.weight.grad).abs())


def test_taylor_global_cut_kept_through_fine_tuning_and_onnx(tiny_job, tmp_path):
    out = LossModelPruner().run(tiny_job, Config())
    assert out.structured is False and out.exact and out.target == 0.2
    scores = taylor_scores(copy.deepcopy(tiny_job.dense), tiny_job.calib, torch.device("cpu"))
    expected = masks_from_scores(scores, 0.2, "global")
    zeros = _zeros(out.model)
    total = sum(z.numel() for z in zeros.values())
    assert sum(int(z.sum()) for z in zeros.values()) == round(0.2 * total)
    for name, mask in expected.items():
        assert torch.equal(zeros[name], mask == 0), name  # the masks survived fine-tuning
    pruned = torch.cat([scores[n][zeros[n]] for n in zeros])
    kept = torch.cat([scores[n][~zeros[n]] for n in zeros])
    assert pruned.max() <= kept.min()
    assert out.info["threshold"] == pytest.approx(float(pruned.max()))
    dense = prunable_layers(tiny_job.dense)
    assert any(
        not torch.equal(m.weight[~zeros[n]], dense[n].weight.detach()[~zeros[n]])
        for n, m in prunable_layers(out.model).items()
    )  # fine-tuned
    r = export_onnx(out.model.eval(), tiny_job.shape, tmp_path / "m.onnx")
    assert r.max_abs_diff is not None and r.max_abs_diff <= 1e-3


def test_importance_kinds_choose_different_weights(tiny_job):
    job = _epochs(tiny_job, 0)
    runs = {
        kind: _zeros(
            LossModelPruner().run(job, parse_overrides(Config, [f"importance={kind}"])).model
        )
        for kind in ("taylor", "magnitude", "random")
    }
    expected = masks_from_scores(magnitude_scores(tiny_job.dense), 0.2, "global")
    assert all(torch.equal(runs["magnitude"][n], m == 0) for n, m in expected.items())
    for a, b in (("taylor", "magnitude"), ("random", "magnitude"), ("taylor", "random")):
        assert any(not torch.equal(runs[a][n], runs[b][n]) for n in expected), (a, b)
    again = _zeros(LossModelPruner().run(job, Config(importance="random")).model)
    assert all(torch.equal(again[n], runs["random"][n]) for n in expected)  # seeded


def test_config_overrides_and_errors():
    assert METHODS.get("LossModelPruner").kind == "unstructured"
    cfg = parse_overrides(Config, ["sparsity=0.3", "importance=magnitude", "n_batches=1"])
    assert (cfg.sparsity, cfg.importance, cfg.n_batches) == (0.3, "magnitude", 1)
    assert parse_overrides(Config, ["n_batches=none"]).n_batches is None
    assert Config().sparsity == 0.2 and Config().importance == "taylor"
    for bad in (["sparsity=1.2"], ["importance=hessian"], ["n_batches=0"], ["sparsity=x"]):
        with pytest.raises(DeepLSPError):
            parse_overrides(Config, bad)
