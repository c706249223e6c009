"""Adaptive-BN evaluation of a pruned network before fine-tuning (EagleEye, Li et al.,
ECCV 2020).

Right after channels are removed, BatchNorm's running statistics describe the dense
network's activations, so a pruned network's plain loss says little about what it
reaches after fine-tuning (on MobileNetV3-Large at 30% of its latency every candidate's
plain accuracy was at chance). EagleEye re-estimates the statistics on a few training
batches (weights frozen) and measures the loss on other batches. Here that ranked five
knapsack answers with L1-ranked channels in the order of their fine-tuned top-1 but for
one swap, and four with Taylor-ranked channels poorly (its pick 3rd of 4; bench/README.md,
session 6). So the knapsack's default selection uses it as a veto, not a ranking: it
leaves the knapsack's own answer only for one whose loss is clearly lower
(`clearly_lower`), which caught a collapsed ResNet-18 answer (session 12).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from deeplsp.errors import DeepLSPError

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def adapted_loss(model: nn.Module, adapt: Batches, held_out: Batches) -> float:
    """Mean cross-entropy on `held_out` after BatchNorm statistics are re-estimated on
    `adapt` (`adapted_losses`)."""
    return float(adapted_losses(model, adapt, held_out).mean())


def lower_by(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """How far per-image losses `a` sit below `b` (the same images) on average, and the
    standard error of that gap from the paired differences."""
    d = b - a
    return float(d.mean()), float(d.std() / len(d) ** 0.5) if len(d) > 1 else 0.0


def clearly_lower(a: torch.Tensor, b: torch.Tensor, z: float = 2.0) -> bool:
    """Whether `a` is below `b` by more than `z` standard errors (`lower_by`). A loss on
    256 held-out images is a noisy reading: ResNet-18 knapsack answers 0.05 nats apart at
    50% of the latency fine-tuned in either order, while a collapsed one (2.21 against
    1.76 at 30%) fine-tuned 9 points lower over three seeds (bench/README.md, session 12)."""
    gap, se = lower_by(a, b)
    return gap > z * se


@torch.no_grad()
def adapted_losses(model: nn.Module, adapt: Batches, held_out: Batches) -> torch.Tensor:
    """Per-image cross-entropy on `held_out` after BatchNorm statistics are re-estimated
    on `adapt`.

    Works on a copy: the given model's statistics and train/eval flags are untouched.
    """
    if not adapt or not held_out:
        raise DeepLSPError("adaptive-BN evaluation needs batches to adapt on and to evaluate")
    model = copy.deepcopy(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the adapt batches
    model.eval()
    for m in norms:
        m.train()
    for images, _ in adapt:
        model(images)
    model.eval()
    return torch.cat(
        [
            nn.functional.cross_entropy(model(images), labels, reduction="none")
            for images, labels in held_out
        ]
    )
