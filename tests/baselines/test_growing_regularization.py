from __future__ import annotations

import dataclasses

import pytest
import torch

from baselines._budget import StepLoader, split_steps
from baselines.growing_regularization import (
    GrowingPenalty,
    GrowingRegularization,
    GrowingRegularizationConfig,
)
from deeplsp.errors import DeepLSPError
from deeplsp.masks import magnitude_scores, masks_from_scores, prunable_layers, sparsity
from deeplsp.methods import METHODS, parse_overrides
from deeplsp.structure import count_channels, find_groups
from export import export_onnx


def _with_epochs(job, epochs: int, **train):
    cfg = dataclasses.replace(job.train_cfg, epochs=epochs, **train)
    return dataclasses.replace(job, train_cfg=cfg)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_structured_removes_half_the_channels_for_real(tiny_job, tmp_path):
    job = _with_epochs(tiny_job, 4)
    dense = {g.id: g.channels for g in find_groups(job.dense, job.shape)}
    out = GrowingRegularization().run(job, GrowingRegularizationConfig())
    model = out.model.cpu().eval()
    assert out.structured and out.target_metric == "channel_reduction" and out.exact
    now = count_channels(model, find_groups(model, job.shape))
    assert out.channels == now
    assert now == {g: c // 2 for g, c in dense.items()}  # every group keeps half
    assert out.info["channel_reduction"] == pytest.approx(0.5)
    assert _params(model) < 0.5 * _params(job.dense)
    assert out.info["reg_steps"] + out.info["finetune_steps"] == 16  # the whole budget, no more
    r = export_onnx(model, job.shape, tmp_path / "m.onnx")
    assert r.max_abs_diff is not None and r.max_abs_diff < 1e-3


def test_growing_penalty_shrinks_only_the_chosen_weights(tiny_job):
    job = _with_epochs(tiny_job, 5, lr=0.02)
    cfg = GrowingRegularizationConfig(delta_lambda=0.1, update_interval=1)
    out = GrowingRegularization().run(job, cfg)
    info = out.info
    assert info["reg_steps"] == 10  # lambda_max = 1 reached after 10 growths
    assert info["lambda_final"] == pytest.approx(1.0)
    assert info["lambda_reached_ceiling"]
    chosen = info["chosen_norm_after"] / info["chosen_norm_before"]
    kept = info["kept_norm_after"] / info["kept_norm_before"]
    assert chosen < 0.5 * kept


def test_regularisation_stops_at_the_ceiling(tiny_job):
    job = _with_epochs(tiny_job, 3)
    cfg = GrowingRegularizationConfig(delta_lambda=1e-3, update_interval=2, lambda_max=2e-3)
    out = GrowingRegularization().run(job, cfg)
    assert out.info["reg_steps"] == 4  # 2 growths of 2 steps, inside the half budget (6)
    assert out.info["finetune_steps"] == 8
    assert out.info["lambda_final"] == pytest.approx(2e-3)


def test_unstructured_keeps_the_chosen_weights_zero(tiny_job, tmp_path):
    job = _with_epochs(tiny_job, 4)
    masks = masks_from_scores(magnitude_scores(job.dense), 0.5, scope="layer")
    out = GrowingRegularization().run(job, GrowingRegularizationConfig(mode="unstructured"))
    model = out.model.cpu().eval()
    assert not out.structured and out.target_metric == "sparsity" and out.target == 0.5
    layers = prunable_layers(model)
    for name, mask in masks.items():
        w = layers[name].weight.detach()
        assert w.shape == mask.shape  # dense shapes
        assert torch.all(w[mask == 0] == 0), name  # the chosen weights are zero...
        assert torch.all(w[mask == 1] != 0), name  # ...and only they
    sp = sparsity(model)
    assert sp["global"] == pytest.approx(0.5, abs=0.01)
    assert all(s == pytest.approx(0.5, abs=0.02) for s in sp["per_layer"].values())
    assert out.info["sparsity"] == pytest.approx(sp["global"])
    r = export_onnx(model, job.shape, tmp_path / "m.onnx")
    assert r.max_abs_diff is not None and r.max_abs_diff < 1e-3


def test_lambda_grows_every_interval_up_to_the_ceiling():
    w = torch.nn.Parameter(torch.ones(4))
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    hooks = GrowingPenalty([(w, mask)], delta=0.25, interval=2, ceiling=0.6)
    assert hooks.extra_loss(None, None, None) is None
    lams = []
    for _ in range(8):
        hooks.after_step(None)
        lams.append(hooks.lam)
    assert lams == pytest.approx([0, 0.25, 0.25, 0.5, 0.5, 0.6, 0.6, 0.6])
    assert hooks.extra_loss(None, None, None).detach().item() == pytest.approx(0.5 * 0.6 * 2)


def test_budget_is_split_in_steps(tiny_job):
    assert split_steps(16, 0.5) == (8, 8)
    assert split_steps(5, 0.5) == (2, 3)
    assert split_steps(1, 0.5) == (1, 0)  # at least one step for the first phase
    assert split_steps(0, 0.5) == (0, 0)
    loader = StepLoader(tiny_job.train_loader, 10)  # 4 batches per pass, cycled
    assert len(loader) == 10 and sum(1 for _ in loader) == 10


def test_config_overrides_and_bad_values():
    assert "GrowingRegularization" in METHODS
    cfg = parse_overrides(GrowingRegularizationConfig, ["sparsity=0.3", "mode=unstructured"])
    assert cfg.sparsity == 0.3 and cfg.mode == "unstructured"
    assert GrowingRegularization().config(["delta_lambda=0.01"]).delta_lambda == 0.01
    for bad in (
        "sparsity=1.5",
        "sparsity=x",
        "mode=channels",
        "update_interval=0",
        "delta_lambda=0",
        "lambda_max=-1",
        "reg_epochs_fraction=0",
        "nope=1",
    ):
        with pytest.raises(DeepLSPError):
            parse_overrides(GrowingRegularizationConfig, [bad])
