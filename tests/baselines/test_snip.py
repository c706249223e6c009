"""SNIP (Lee et al. 2019): connection sensitivity at initialisation, then training from scratch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from baselines.snip import SNIP, Config
from deeplsp.errors import DeepLSPError
from deeplsp.masks import prunable_layers
from deeplsp.methods import METHODS, parse_overrides
from export import export_onnx


def _epochs(job, epochs):
    return dataclasses.replace(job, train_cfg=dataclasses.replace(job.train_cfg, epochs=epochs))


class _NoTeacher(nn.Module):
    def forward(self, x):
        raise AssertionError("SNIP must not use the trained dense model")


def test_prunes_the_initialisation_by_connection_sensitivity(tiny_job):
    out = SNIP().run(_epochs(tiny_job, 0), Config())
    init = tiny_job.fresh_model().train()
    images, labels = tiny_job.calib[0]
    nn.functional.cross_entropy(init(images), labels).backward()
    init_layers = prunable_layers(init)
    pruned, kept, zeros, total = [], [], 0, 0
    for name, m in prunable_layers(out.model).items():
        w0 = init_layers[name].weight
        keep = m.weight != 0
        # the untrained output is the initialisation with the cut applied
        torch.testing.assert_close(m.weight.detach(), w0.detach() * keep)
        s = (w0.grad * w0.detach()).abs()
        pruned.append(s[~keep])
        kept.append(s[keep])
        zeros, total = zeros + int((~keep).sum()), total + keep.numel()
    assert zeros == round(0.5 * total)
    assert torch.cat(pruned).max() <= torch.cat(kept).min()  # one global cut on |g*w|
    bn = [m for m in out.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(float(b.running_mean.abs().max()) == 0 for b in bn)  # scoring left BN at init


def test_trains_from_scratch_with_masks_and_no_teacher(tiny_job, tmp_path):
    untrained = SNIP().run(_epochs(tiny_job, 0), Config())
    job = dataclasses.replace(tiny_job, dense=_NoTeacher())
    out = SNIP().run(job, Config())
    assert out.structured is False and out.exact and out.target == 0.5
    before = prunable_layers(untrained.model)
    for name, m in prunable_layers(out.model).items():
        zero = before[name].weight == 0
        assert torch.equal(m.weight == 0, zero), name  # masks enforced through training
    assert any(
        not torch.equal(m.weight, before[n].weight) for n, m in prunable_layers(out.model).items()
    )  # it trained
    assert out.info["from_scratch_epochs"] == 1 and out.info["calib_batches"] == 1
    r = export_onnx(out.model.eval(), job.shape, tmp_path / "m.onnx")
    assert r.max_abs_diff is not None and r.max_abs_diff <= 1e-3


def test_more_batches_and_other_sparsity(tiny_job):
    out = SNIP().run(_epochs(tiny_job, 0), parse_overrides(Config, ["n_batches=2", "sparsity=0.8"]))
    assert out.info["calib_batches"] == 2
    assert out.info["sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_config_overrides_and_errors():
    assert METHODS.get("SNIP").kind == "unstructured"
    cfg = parse_overrides(Config, ["sparsity=0.3", "n_batches=3"])
    assert (cfg.sparsity, cfg.n_batches) == (0.3, 3)
    assert Config().sparsity == 0.5 and Config().n_batches == 1
    for bad in (["sparsity=1"], ["sparsity=-0.1"], ["n_batches=0"], ["n_batches=1.5"]):
        with pytest.raises(DeepLSPError):
            parse_overrides(Config, bad)
