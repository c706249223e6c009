"""HybridPruner: sensitivity-set per-layer channel ratios, then unstructured weight pruning.

A per-layer sensitivity scan on validation data (as in Li et al. 2017's sensitivity
analysis): for each channel group and each ratio on a small grid, the group's
lowest-L1 channels are silenced and the validation accuracy drop measured. Each group
gets the largest ratio whose drop (and every smaller ratio's) stays within
`max_drop`, capped at `max_ratio`, so the overall channel reduction comes out of the
data rather than being set. Those channels are removed for real, then `weight_sparsity`
of every remaining layer's weights is zeroed by magnitude, and the network fine-tuned
with distillation and the masks kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from deeplsp.errors import DeepLSPError
from deeplsp.masks import MaskHooks, apply_masks, magnitude_scores, masks_from_scores, sparsity
from deeplsp.methods import Batches, Method, Outcome, PruneJob, register
from deeplsp.structure import (
    ChannelGroup,
    count_channels,
    find_groups,
    prune_groups,
    removal_order,
    round_channels,
)
from deeplsp.training import resolve_device, train


@dataclass
class HybridConfig:
    max_drop: float = 0.02  # largest validation top-1 drop a group may cause on its own
    max_ratio: float = 0.5  # cap on any group's channel ratio
    step: float = 0.1  # the ratio grid: step, 2*step, ... up to max_ratio
    weight_sparsity: float = 0.2  # of the remaining weights, per layer

    def __post_init__(self) -> None:
        if not 0 <= self.max_drop < 1:
            raise DeepLSPError(f"max_drop must be in [0, 1) (got {self.max_drop})")
        if not 0 < self.max_ratio < 1:
            raise DeepLSPError(f"max_ratio must be in (0, 1) (got {self.max_ratio})")
        if not 0 < self.step <= self.max_ratio:
            raise DeepLSPError(f"step must be in (0, max_ratio] (got {self.step})")
        if not 0 <= self.weight_sparsity < 1:
            raise DeepLSPError(f"weight_sparsity must be in [0, 1) (got {self.weight_sparsity})")

    def grid(self) -> list[float]:
        n = int(self.max_ratio / self.step + 1e-9)
        return [round(self.step * i, 6) for i in range(1, n + 1)]


@torch.no_grad()
def val_metrics(model: nn.Module, batches: Batches) -> tuple[float, float]:
    """Top-1 accuracy and mean loss on the validation batches."""
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    loss = 0.0
    for images, labels in batches:
        labels = labels.to(device)
        logits = model(images.to(device))
        loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        total += labels.numel()
    if total == 0:
        raise DeepLSPError("HybridPruner needs validation batches (job.val is empty)")
    return correct / total, loss / total


@torch.no_grad()
def silence(model: nn.Module, group: ChannelGroup, idx: list[int]) -> None:
    """Zero the channels' filters, biases and BatchNorm scale and shift: every producer
    then outputs 0 there, which is what removing the channels does downstream."""
    modules = dict(model.named_modules())
    for name in (*group.outputs, *group.norms):
        m = modules[name]
        i = torch.tensor(idx, dtype=torch.long, device=m.weight.device)
        m.weight[i] = 0
        if getattr(m, "bias", None) is not None:
            m.bias[i] = 0


def sensitivity_scan(
    model: nn.Module,
    groups: list[ChannelGroup],
    order: dict[str, list[int]],
    cfg: HybridConfig,
    batches: Batches,
) -> tuple[dict[str, float], dict[str, dict[str, list[float]]]]:
    """Per group, the chosen ratio and the (ratio, top-1 drop, loss rise) it saw."""
    scratch = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base_acc, base_loss = val_metrics(model, batches)
    chosen: dict[str, float] = {}
    table: dict[str, dict[str, list[float]]] = {}
    for g in groups:
        chosen[g.id] = 0.0
        table[g.id] = {"ratio": [], "top1_drop": [], "loss_rise": []}
        for r in cfg.grid():
            n_drop = g.channels - round_channels(g.channels, 1 - r)
            scratch.load_state_dict(state)
            silence(scratch, g, order[g.id][:n_drop])
            acc, loss = val_metrics(scratch, batches)
            table[g.id]["ratio"].append(r)
            table[g.id]["top1_drop"].append(base_acc - acc)
            table[g.id]["loss_rise"].append(loss - base_loss)
            if base_acc - acc > cfg.max_drop:
                break  # a larger ratio of a group that already hurts is not tried
            chosen[g.id] = r
    return chosen, table


@register
class HybridPruner(Method):
    name = "HybridPruner"
    description = (
        "per-layer sensitivity scan on validation data sets channel ratios (Li et al. "
        "2017 style), then structured channel + unstructured magnitude weight pruning"
    )
    kind = "hybrid"
    Config = HybridConfig

    def run(self, job: PruneJob, cfg: HybridConfig) -> Outcome:
        model = job.copy_dense().to(resolve_device(job.train_cfg.device))
        groups = find_groups(model, job.shape)
        order = removal_order(model, job.shape, "l1")  # the channels prune_groups drops
        ratios, table = sensitivity_scan(model, groups, order, cfg, job.val)
        before = {g.id: g.channels for g in groups}
        keep = {g: round_channels(c, 1 - ratios[g]) for g, c in before.items()}
        prune_groups(model, job.shape, keep, order=order)
        kept = count_channels(model, groups)
        reduction = 1 - sum(kept.values()) / max(sum(before.values()), 1)
        job.log(f"HybridPruner: sensitivity chose channel reduction {reduction:.3f}")
        masks = masks_from_scores(magnitude_scores(model), cfg.weight_sparsity, scope="layer")
        apply_masks(model, masks)
        train(model, job.train_loader, job.train_cfg, MaskHooks(model, masks, job.dense), "hybrid")
        apply_masks(model, masks)
        return Outcome(
            model,
            structured=True,
            target_metric="channel_reduction",
            target=reduction,
            exact=False,
            channels=kept,
            info={
                "channel_reduction": reduction,
                "weight_sparsity": sparsity(model)["global"],
                "weight_sparsity_target": cfg.weight_sparsity,
                "group_ratios": ratios,
                "channels_before": before,
                "sensitivity": table,
            },
        )
