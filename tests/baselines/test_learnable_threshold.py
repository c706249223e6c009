from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.nn.utils import parametrize

import baselines.learnable_threshold as str_module
from baselines.learnable_threshold import (
    LearnableThreshold,
    LearnableThresholdConfig,
    SoftThreshold,
    ThresholdHooks,
)
from deeplsp.errors import DeepLSPError
from deeplsp.masks import prunable_layers, sparsity
from deeplsp.methods import METHODS, parse_overrides
from export import export_onnx


def _with_epochs(job, epochs: int, **train):
    cfg = dataclasses.replace(job.train_cfg, epochs=epochs, **train)
    return dataclasses.replace(job, train_cfg=cfg)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_sparsity_emerges_and_stops_near_the_target(tiny_job, tmp_path):
    job = _with_epochs(tiny_job, 10)
    cfg = LearnableThresholdConfig()
    out = LearnableThreshold().run(job, cfg)
    model = out.model.cpu().eval()
    info = out.info
    assert not out.structured and not out.exact and out.target == 0.7
    achieved = sparsity(model)["global"]
    assert info["achieved_sparsity"] == pytest.approx(achieved)
    assert info["gap"] == pytest.approx(achieved - 0.7)
    assert abs(info["gap"]) < 0.1  # inexact by design, but steered close
    assert info["sparsity_at_start"] < 0.2 < achieved  # it emerged during training
    assert info["reached_at_step"] is not None and info["reached_at_step"] < info["steps"]
    assert all(t > _sigmoid(cfg.s_init) for t in info["thresholds"].values())
    # a plain model again: no parametrizations, the dense model's parameter names
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert model.state_dict().keys() == job.dense.state_dict().keys()
    r = export_onnx(model, job.shape, tmp_path / "m.onnx")
    assert r.max_abs_diff is not None and r.max_abs_diff < 1e-3


def test_a_lower_target_stops_the_thresholds_earlier(tiny_job):
    job = _with_epochs(tiny_job, 10)
    out = LearnableThreshold().run(job, LearnableThresholdConfig(target_sparsity=0.4))
    assert 0.4 <= out.info["achieved_sparsity"] < 0.5
    assert out.info["threshold_updates"] < out.info["steps"]


def test_short_budget_reports_its_gap_and_cut_keeps_the_learned_zeros(tiny_job, monkeypatch):
    short = LearnableThreshold().run(tiny_job, LearnableThresholdConfig())  # 4 steps
    assert short.info["gap"] < -0.2 and not short.info["cut_applied"]  # honest: no cut
    assert sparsity(short.model)["global"] == pytest.approx(short.info["achieved_sparsity"])

    before = {}
    original = str_module.apply_masks

    def spy(model, masks):  # the weights just before the cut
        before.update({n: m.weight.detach().clone() for n, m in prunable_layers(model).items()})
        return original(model, masks)

    monkeypatch.setattr(str_module, "apply_masks", spy)
    out = LearnableThreshold().run(tiny_job, LearnableThresholdConfig(finalize="cut"))
    info = out.info
    assert info["cut_applied"] and info["finalize"] == "cut"
    assert info["sparsity_before_cut"] == pytest.approx(short.info["achieved_sparsity"])
    assert sparsity(out.model)["global"] == pytest.approx(0.7, abs=0.01)
    for name, layer in prunable_layers(out.model).items():
        assert torch.all(layer.weight.detach()[before[name] == 0] == 0), name


def test_soft_threshold_zeroes_small_weights_and_learns_its_threshold():
    s = torch.tensor(math.log(0.1 / 0.9), requires_grad=True)  # sigmoid(s) = 0.1
    w = torch.tensor([0.5, -0.05, -0.3, 0.1])
    out = SoftThreshold(s)(w)
    assert torch.allclose(out, torch.tensor([0.4, 0.0, -0.2, 0.0]))
    out.abs().sum().backward()  # a higher threshold shrinks every surviving weight
    assert s.grad is not None and float(s.grad) == pytest.approx(-2 * 0.1 * 0.9)


def test_thresholds_rise_only_while_under_the_target():
    w = torch.linspace(-1, 1, 101)
    s = {"w": torch.tensor(-5.0, requires_grad=True)}
    hooks = ThresholdHooks({"w": w}, s, 0.1, 1.0, 0.0, steps=10, target=0.5)
    for _ in range(3):
        s["w"].grad = torch.zeros(())
        hooks.after_step(None)
    assert float(s["w"].detach()) > -5.0 and hooks.s_steps == 3 and hooks.reached_at is None
    high = ThresholdHooks({"w": w}, s, 0.1, 1.0, 0.0, steps=10, target=0.01)
    frozen = float(s["w"].detach())
    s["w"].grad = torch.zeros(())
    high.after_step(None)  # 2 of 101 weights are under sigmoid(s) already: at the target
    assert float(s["w"].detach()) == frozen and high.reached_at == 1 and high.s_steps == 0


def test_config_overrides_and_bad_values():
    assert "LearnableThreshold" in METHODS
    cfg = parse_overrides(
        LearnableThresholdConfig, ["target_sparsity=0.5", "s_lr=0.1", "finalize=cut"]
    )
    assert (cfg.target_sparsity, cfg.s_lr, cfg.finalize) == (0.5, 0.1, "cut")
    assert parse_overrides(LearnableThresholdConfig, ["s_weight_decay=none"]).s_weight_decay is None
    for bad in (
        "target_sparsity=1.2",
        "target_sparsity=0",
        "s_init=1",
        "s_lr=0",
        "s_weight_decay=-1",
        "s_momentum=1",
        "ramp_fraction=0",
        "finalize=magnitude",
        "sparsity=0.5",
    ):
        with pytest.raises(DeepLSPError):
            parse_overrides(LearnableThresholdConfig, [bad])
