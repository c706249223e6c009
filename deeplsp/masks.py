"""Unstructured sparsity: masks over conv and linear weights, kept through training.

Every unstructured method ends in the same place: a dense-shaped model whose
masked weights are exactly zero, through fine-tuning and into the ONNX file.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from deeplsp.errors import DeepLSPError

PRUNABLE = (nn.Conv2d, nn.Linear)
Masks = dict[str, torch.Tensor]  # layer name -> 0/1 tensor shaped like its weight


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv and linear layers by name: the weights that sparsity is counted over."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE)}


def masks_from_scores(
    scores: Mapping[str, torch.Tensor], sparsity: float, scope: str = "global"
) -> Masks:
    """Zero the lowest-scoring `sparsity` fraction of weights, exactly (ties broken by order).

    scope "global": one ranking over all layers; "layer": the fraction in every layer.
    """
    if not 0 <= sparsity < 1:
        raise DeepLSPError(f"sparsity must be in [0, 1) (got {sparsity})")
    if scope not in ("global", "layer"):
        raise DeepLSPError(f"scope must be 'global' or 'layer' (got {scope!r})")
    if scope == "layer":
        return {n: _keep_top(s.flatten(), sparsity).view_as(s) for n, s in scores.items()}
    flat = torch.cat([s.detach().flatten().float() for s in scores.values()])
    keep = _keep_top(flat, sparsity)
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start : start + s.numel()].view_as(s)
        start += s.numel()
    return masks


def _keep_top(flat: torch.Tensor, sparsity: float) -> torch.Tensor:
    n_zero = int(round(sparsity * flat.numel()))
    mask = torch.ones_like(flat, dtype=torch.float32)
    if n_zero > 0:
        mask[torch.argsort(flat.detach().float(), stable=True)[:n_zero]] = 0.0
    return mask


def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().abs() for n, m in prunable_layers(model).items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    layers = prunable_layers(model)
    for name, mask in masks.items():
        w = layers[name].weight
        w.mul_(mask.to(w.device, w.dtype))


def masks_of(model: nn.Module) -> Masks:
    """The masks a model's zeros imply (to keep them zero through more training)."""
    return {n: (m.weight.detach() != 0).float() for n, m in prunable_layers(model).items()}


def sparsity(model: nn.Module) -> dict:
    """Fraction of zero conv/linear weights, globally and per layer."""
    per_layer, zeros, total = {}, 0, 0
    for name, m in prunable_layers(model).items():
        z, n = int((m.weight == 0).sum()), m.weight.numel()
        per_layer[name] = z / n
        zeros, total = zeros + z, total + n
    return {"global": zeros / max(total, 1), "per_layer": per_layer, "weights": total}


class MaskHooks:
    """Training hooks: keep masked weights at zero after every step, and optionally
    distil from a teacher (the dense model)."""

    def __init__(
        self,
        model: nn.Module,
        masks: Mapping[str, torch.Tensor],
        teacher: nn.Module | None = None,
        alpha: float = 0.5,
        temperature: float = 4.0,
    ) -> None:
        layers = prunable_layers(model)
        self.pairs = [(layers[n].weight, m) for n, m in masks.items()]
        self.teacher = teacher.eval() if teacher is not None else None
        self.alpha = alpha
        self.t = temperature

    def extra_loss(self, model, images, logits):
        if self.teacher is None or self.alpha == 0:
            return None
        with torch.no_grad():
            self.teacher.to(images.device)
            target = self.teacher(images)
        t = self.t
        kd = nn.functional.kl_div(
            nn.functional.log_softmax(logits / t, 1),
            nn.functional.softmax(target / t, 1),
            reduction="batchmean",
        )
        return self.alpha * t * t * kd

    @torch.no_grad()
    def after_step(self, model):
        for w, m in self.pairs:
            w.mul_(m.to(w.device, w.dtype))
