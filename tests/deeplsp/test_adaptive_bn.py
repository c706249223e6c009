"""Adaptive-BN evaluation: statistics re-estimated on a copy, loss on held-out batches."""

import pytest
import torch
from torch import nn

from deeplsp.adaptive_bn import adapted_loss, adapted_losses, clearly_lower, lower_by
from deeplsp.errors import DeepLSPError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def _batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(16, 1, 6, 6, generator=g)
        y = (x.mean(dim=(1, 2, 3)) > 0).long()  # a learnable rule
        out.append((x, y))
    return out


def _plain_loss(model, batches) -> float:
    with torch.no_grad():
        model.eval()
        return sum(
            nn.functional.cross_entropy(model(x), y, reduction="sum").item() for x, y in batches
        ) / sum(len(y) for _, y in batches)


def test_stale_statistics_are_re_estimated_and_the_model_is_left_alone():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in _batches(30, 1):  # train, so the running statistics fit the data
        model.train()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    held = _batches(4, 3)
    good = adapted_loss(model, _batches(4, 2), held)
    with torch.no_grad():  # what removing channels does: the statistics go stale
        model[1].running_mean += 3.0
        model[1].running_var *= 10.0
    stale = _plain_loss(model, held)
    mean_before = model[1].running_mean.clone()
    model.train()
    adapted = adapted_loss(model, _batches(4, 2), held)
    assert adapted < stale
    assert adapted == pytest.approx(good, rel=1e-6)  # the stale statistics play no part
    assert torch.equal(model[1].running_mean, mean_before) and model.training


def test_no_batches_is_a_clear_error():
    with pytest.raises(DeepLSPError, match="needs batches"):
        adapted_loss(_net(), [], _batches(1, 0))


def test_per_image_losses_average_to_the_loss():
    model = _net()
    adapt, held = _batches(2, 2), _batches(3, 3)
    losses = adapted_losses(model, adapt, held)
    assert losses.shape == (48,) and bool((losses >= 0).all())
    assert adapted_loss(model, adapt, held) == pytest.approx(float(losses.mean()))


def test_a_gap_counts_as_clear_only_beyond_two_standard_errors_of_the_paired_differences():
    base = torch.linspace(0.5, 2.5, 100)  # the images' own difficulty cancels in pairs
    swing = torch.tensor([1.0, -1.0]).repeat(50)  # differences 0.1 +- 1: standard error 0.1
    gap, se = lower_by(base - 0.1 + swing, base)
    assert gap == pytest.approx(0.1) and se == pytest.approx((100 / 99) ** 0.5 / 10)
    assert not clearly_lower(base - 0.1 + swing, base)  # 1 standard error
    assert clearly_lower(base - 0.1 + 0.2 * swing, base)  # 5 standard errors
    assert not clearly_lower(base + 0.1, base)  # higher is never lower
    assert clearly_lower(base - 0.01, base)  # no scatter: any gap is clear
    assert not clearly_lower(base, base)
