"""L1StructuredPruning: Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017).

Every layer loses the same fraction of its filters, the ones with the smallest L1
norm (sum of |w| over the filter), removed for real together with the feature maps
they produce and the kernels that read them; then the smaller network is
fine-tuned. Filters coupled by a residual addition are ranked together (the sum of
their L1 norms), as the paper does for projection shortcuts. The "kernel" variant
zeroes the lowest-L1 2-D kernels of every convolution instead (dense shapes, masks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from deeplsp.errors import DeepLSPError
from deeplsp.masks import MaskHooks, Masks, apply_masks, masks_from_scores, sparsity
from deeplsp.methods import Method, Outcome, PruneJob, register
from deeplsp.structure import (
    ChannelGroup,
    count_channels,
    find_groups,
    remove_channels,
    round_channels,
)
from deeplsp.training import train


@dataclass
class L1StructuredConfig:
    ratio: float = 0.5  # fraction of filters (or kernels) removed in every layer
    variant: Literal["filter", "kernel"] = "filter"

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise DeepLSPError(f"ratio must be in [0, 1) (got {self.ratio})")
        if self.variant not in ("filter", "kernel"):
            raise DeepLSPError(f"variant must be 'filter' or 'kernel' (got {self.variant!r})")


def filter_l1(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """L1 norm of each of the group's filters, summed over the layers that produce them."""
    modules = dict(model.named_modules())
    return sum(modules[n].weight.detach().abs().flatten(1).sum(1) for n in group.outputs)


def filter_drop(model: nn.Module, groups: list[ChannelGroup], ratio: float) -> dict[str, list]:
    """Per group, the indices of its `ratio` lowest-L1 filters (at least one kept)."""
    drop = {}
    for g in groups:
        n_drop = g.channels - round_channels(g.channels, 1 - ratio)
        order = torch.argsort(filter_l1(model, g), stable=True)
        drop[g.id] = sorted(order[:n_drop].tolist())
    return drop


def kernel_masks(model: nn.Module, ratio: float) -> Masks:
    """Zero the `ratio` lowest-L1 2-D kernels (one (out, in) pair) of every convolution."""
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight.detach()
            keep = masks_from_scores({name: w.abs().sum((2, 3))}, ratio, scope="layer")[name]
            masks[name] = keep[:, :, None, None].expand_as(w).contiguous()
    return masks


def _weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


@register
class L1StructuredPruning(Method):
    name = "L1StructuredPruning"
    description = "Li et al. ICLR 2017: remove a fixed ratio of filters per layer by L1 norm"
    kind = "structured"
    Config = L1StructuredConfig

    def run(self, job: PruneJob, cfg: L1StructuredConfig) -> Outcome:
        model = job.copy_dense()
        if cfg.variant == "kernel":
            return self._kernels(job, cfg, model)
        groups = find_groups(model, job.shape)
        before = {g.id: g.channels for g in groups}
        drop = filter_drop(model, groups, cfg.ratio)
        remove_channels(model, job.shape, drop)
        kept = count_channels(model, groups)
        achieved = 1 - sum(kept.values()) / sum(before.values())
        job.log(f"L1StructuredPruning: removed {achieved:.3f} of channels (target {cfg.ratio})")
        train(model, job.train_loader, job.train_cfg, MaskHooks(model, {}, job.dense), "l1-ft")
        return Outcome(
            model,
            structured=True,
            target_metric="channel_reduction",
            target=cfg.ratio,
            exact=True,
            channels=kept,
            info={
                "variant": "filter",
                "channel_reduction": achieved,
                "channels_before": before,
                "removed": {g: len(i) for g, i in drop.items()},
            },
        )

    def _kernels(self, job: PruneJob, cfg: L1StructuredConfig, model: nn.Module) -> Outcome:
        masks = kernel_masks(model, cfg.ratio)
        apply_masks(model, masks)
        # Linear layers stay dense, so the global sparsity this plan gives is below `ratio`.
        zeroed = sum(int((m == 0).sum()) for m in masks.values())
        target = zeroed / _weights(model)
        job.log(f"L1StructuredPruning: zeroed {cfg.ratio} of conv kernels, sparsity {target:.3f}")
        hooks = MaskHooks(model, masks, teacher=job.dense)
        train(model, job.train_loader, job.train_cfg, hooks, "l1-kernel-ft")
        apply_masks(model, masks)
        return Outcome(
            model,
            structured=False,
            target_metric="sparsity",
            target=target,
            exact=True,
            info={
                "variant": "kernel",
                "kernel_ratio": cfg.ratio,
                "sparsity": sparsity(model)["global"],
            },
        )
