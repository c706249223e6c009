from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import baselines.admm_pruner as admm_module
from baselines.admm_pruner import (
    ADMMHooks,
    ADMMPruner,
    ADMMPrunerConfig,
    cut_fraction,
    project,
    schedule,
)
from deeplsp.errors import DeepLSPError
from deeplsp.masks import prunable_layers, sparsity
from deeplsp.methods import METHODS, parse_overrides
from export import export_onnx


def _with_epochs(job, epochs: int, **train):
    cfg = dataclasses.replace(job.train_cfg, epochs=epochs, **train)
    return dataclasses.replace(job, train_cfg=cfg)


def test_hard_prune_is_exact_and_retraining_keeps_the_zeros(tiny_job, tmp_path, monkeypatch):
    applied, original = {}, admm_module.apply_masks

    def spy(model, masks):  # record the hard cut's masks
        applied.update({n: m.clone() for n, m in masks.items()})
        return original(model, masks)

    monkeypatch.setattr(admm_module, "apply_masks", spy)
    job = _with_epochs(tiny_job, 4)
    out = ADMMPruner().run(job, ADMMPrunerConfig())
    model = out.model.cpu().eval()
    assert not out.structured and out.exact and out.target == 0.5
    assert out.info["admm_steps"] + out.info["retrain_steps"] == 16  # the budget, no more
    layers = prunable_layers(model)
    assert set(applied) == set(layers)
    for name, mask in applied.items():
        w = layers[name].weight.detach()
        assert int((mask == 0).sum()) == round(0.5 * w.numel()), name  # per layer, exact
        assert torch.all(w[mask.cpu() == 0] == 0), name  # still zero after retraining
    assert sparsity(model)["global"] == pytest.approx(0.5, abs=0.01)
    assert out.info["sparsity"] == pytest.approx(sparsity(model)["global"])
    r = export_onnx(model, job.shape, tmp_path / "m.onnx")
    assert r.max_abs_diff is not None and r.max_abs_diff < 1e-3


def test_admm_pulls_the_weights_onto_the_sparse_set(tiny_job):
    job = _with_epochs(tiny_job, 8, optimizer="sgd", lr=0.05)
    cfg = ADMMPrunerConfig(rho=1.0, stages=1, admm_interval=8, admm_epochs_fraction=0.75)
    out = ADMMPruner().run(job, cfg)
    info = out.info
    history = info["residual_history"]
    assert [h["step"] for h in history] == [8, 16, 24]
    assert info["residual_final"] == history[-1]["residual"]
    dense = cut_fraction(job.dense, 0.5)
    assert info["cut_fraction_dense"] == pytest.approx(dense)
    # the dense weights are far from the sparse set; after ADMM they are close to it
    assert info["residual_final"] < 0.5 * dense
    assert info["cut_fraction"] < 0.5 * dense


def test_progressive_schedule_ramps_to_the_target(tiny_job):
    assert schedule(0.6, 3) == pytest.approx([0.2, 0.4, 0.6])
    job = _with_epochs(tiny_job, 3)
    out = ADMMPruner().run(job, ADMMPrunerConfig(sparsity=0.6, admm_interval=1))
    levels = [h["sparsity"] for h in out.info["residual_history"]]
    assert len(levels) == out.info["admm_steps"] == 6
    assert levels == pytest.approx([0.2, 0.2, 0.4, 0.4, 0.6, 0.6])
    assert sparsity(out.model)["global"] == pytest.approx(0.6, abs=0.01)


def test_z_and_u_steps_follow_scaled_admm():
    layer = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -0.2, 0.3, -2.0]]))
    hooks = ADMMHooks(layer, rho=0.1, schedule=[0.5], steps=4, interval=2)
    w = layer.weight
    assert torch.equal(hooks.Z[""], torch.tensor([[1.0, 0.0, 0.0, -2.0]]))  # Z0 = proj(W)
    assert float(hooks.extra_loss(layer, None, None).detach()) == pytest.approx(
        0.05 * (0.04 + 0.09)
    )
    hooks.U[""] = torch.tensor([[0.0, -0.5, 0.0, 0.0]])
    with torch.no_grad():
        w.copy_(torch.tensor([[0.9, -0.1, 0.4, -1.5]]))
    hooks.after_step(layer)  # step 1: no update yet
    assert torch.equal(hooks.U[""], torch.tensor([[0.0, -0.5, 0.0, 0.0]]))
    hooks.after_step(layer)  # step 2: Z = proj(W + U), U += W - Z
    assert torch.allclose(hooks.Z[""], torch.tensor([[0.9, 0.0, 0.0, -1.5]]))
    assert torch.allclose(hooks.U[""], torch.tensor([[0.0, -0.6, 0.4, 0.0]]))
    assert hooks.history[-1]["residual"] == pytest.approx(
        math.sqrt((0.01 + 0.16) / (0.81 + 0.01 + 0.16 + 2.25))
    )


def test_projection_keeps_the_largest_magnitudes():
    w = torch.tensor([[0.1, -3.0, 0.5], [2.0, -0.2, 0.0]])
    z = project(w, 0.5)
    assert torch.equal(z, torch.tensor([[0.0, -3.0, 0.5], [2.0, 0.0, 0.0]]))


def test_config_overrides_and_bad_values():
    assert "ADMMPruner" in METHODS
    cfg = parse_overrides(ADMMPrunerConfig, ["sparsity=0.3", "rho=0.01", "admm_interval=7"])
    assert (cfg.sparsity, cfg.rho, cfg.admm_interval) == (0.3, 0.01, 7)
    assert parse_overrides(ADMMPrunerConfig, ["admm_interval=none"]).admm_interval is None
    for bad in (
        "sparsity=1",
        "sparsity=-0.1",
        "rho=0",
        "stages=0",
        "admm_interval=0",
        "admm_epochs_fraction=1.5",
        "rho=big",
    ):
        with pytest.raises(DeepLSPError):
            parse_overrides(ADMMPrunerConfig, [bad])
