"""GrowingRegularization: Wang et al., "Neural Pruning via Growing Regularization", ICLR 2021.

GReg-1: choose what to remove up front by L1 magnitude, then train with an L2
penalty on exactly those weights whose coefficient grows on a schedule
(lambda += delta_lambda every `update_interval` steps, up to `lambda_max`), so
the network learns to do without them before they are cut; then prune them and
fine-tune. Structured mode removes whole channel groups (for real); unstructured
mode zeroes single weights, per layer, and keeps them zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from baselines._budget import split_steps, total_steps, train_steps
from deeplsp.errors import DeepLSPError
from deeplsp.masks import (
    MaskHooks,
    apply_masks,
    magnitude_scores,
    masks_from_scores,
    prunable_layers,
    sparsity,
)
from deeplsp.methods import Method, Outcome, PruneJob, register
from deeplsp.structure import (
    count_channels,
    find_groups,
    removal_order,
    remove_channels,
    round_channels,
)
from deeplsp.training import resolve_device


@dataclass
class GrowingRegularizationConfig:
    sparsity: float = 0.5  # structured: fraction of each group's channels; else of each layer
    mode: Literal["structured", "unstructured"] = "structured"
    delta_lambda: float = 1e-4  # the paper's growth step
    update_interval: int = 5  # steps between growths (the paper: 10 iterations)
    lambda_max: float = 1.0  # the paper's ceiling: regularisation ends when reached
    reg_epochs_fraction: float = 0.5  # share of the budget the regularisation may use at most

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise DeepLSPError(f"sparsity must be in [0, 1) (got {self.sparsity})")
        if self.mode not in ("structured", "unstructured"):
            raise DeepLSPError(f"mode must be structured or unstructured (got {self.mode!r})")
        if not self.delta_lambda > 0:
            raise DeepLSPError(f"delta_lambda must be > 0 (got {self.delta_lambda})")
        if self.update_interval < 1:
            raise DeepLSPError(f"update_interval must be >= 1 (got {self.update_interval})")
        if not self.lambda_max > 0:
            raise DeepLSPError(f"lambda_max must be > 0 (got {self.lambda_max})")
        if not 0 < self.reg_epochs_fraction <= 1:
            raise DeepLSPError(
                f"reg_epochs_fraction must be in (0, 1] (got {self.reg_epochs_fraction})"
            )


Selection = list[tuple[torch.Tensor, torch.Tensor]]  # (parameter, 0/1 mask of chosen entries)


class GrowingPenalty:
    """Training hooks: lambda/2 * ||chosen weights||^2 added to the loss, lambda grown every
    `interval` steps (its gradient, lambda * w, is the paper's update)."""

    def __init__(self, chosen: Selection, delta: float, interval: int, ceiling: float) -> None:
        self.chosen = chosen
        self.delta, self.interval, self.ceiling = delta, interval, ceiling
        self.growths_to_ceiling = math.ceil(ceiling / delta - 1e-9)  # robust to 1.0 / 0.1
        self.growths = 0
        self.lam = 0.0
        self.steps = 0

    @property
    def steps_to_ceiling(self) -> int:
        return self.growths_to_ceiling * self.interval

    @property
    def at_ceiling(self) -> bool:
        return self.growths >= self.growths_to_ceiling

    def extra_loss(self, model: nn.Module, images: torch.Tensor, logits: torch.Tensor):
        if self.lam == 0:
            return None
        return 0.5 * self.lam * sum(((p * m) ** 2).sum() for p, m in self.chosen)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        self.steps += 1
        if self.steps % self.interval == 0 and not self.at_ceiling:
            self.growths += 1
            self.lam = self.ceiling if self.at_ceiling else self.growths * self.delta


@torch.no_grad()
def _norms(chosen: Selection) -> tuple[float, float]:
    """L2 norms of the chosen and of the other (kept) entries of the selected parameters."""
    drop = sum(float(((p * m) ** 2).sum()) for p, m in chosen)
    keep = sum(float(((p * (1 - m)) ** 2).sum()) for p, m in chosen)
    return math.sqrt(drop), math.sqrt(keep)


def _rows(param: torch.Tensor, idxs: list[int]) -> torch.Tensor:
    mask = torch.zeros_like(param)
    mask[idxs] = 1.0
    return mask


def _structured_choice(
    model: nn.Module, shape: tuple[int, ...], ratio: float
) -> tuple[dict[str, list[int]], Selection, dict[str, int]]:
    """Each group's lowest-L1 channels (keep = round(channels * (1 - ratio))) and the output
    filters (weights and biases) of every layer that produces them: the paper's filters."""
    order = removal_order(model, shape, "l1")
    modules = dict(model.named_modules())
    drop: dict[str, list[int]] = {}
    chosen: Selection = []
    groups = find_groups(model, shape)
    for g in groups:
        keep = round_channels(g.channels, 1.0 - ratio)
        idxs = sorted(order[g.id][: g.channels - keep])
        if not idxs:
            continue
        drop[g.id] = idxs
        for name in g.outputs:
            layer = modules[name]
            for p in (layer.weight, getattr(layer, "bias", None)):
                if p is not None:
                    chosen.append((p, _rows(p, idxs)))
    return drop, chosen, {g.id: g.channels for g in groups}


@register
class GrowingRegularization(Method):
    name = "GrowingRegularization"
    description = "Wang et al. ICLR 2021 (GReg-1): growing L2 penalty on the weights to remove"
    kind = "structured"  # default mode; mode=unstructured prunes single weights
    Config = GrowingRegularizationConfig

    def run(self, job: PruneJob, cfg: GrowingRegularizationConfig) -> Outcome:
        model = job.copy_dense().to(resolve_device(job.train_cfg.device))
        total = total_steps(job)
        share, _ = split_steps(total, cfg.reg_epochs_fraction)

        structured = cfg.mode == "structured"
        if structured:
            drop, chosen, dense = _structured_choice(model, job.shape, cfg.sparsity)
            masks = {}
        else:
            masks = masks_from_scores(magnitude_scores(model), cfg.sparsity, scope="layer")
            layers = prunable_layers(model)
            chosen = [(layers[n].weight, 1.0 - m.to(layers[n].weight)) for n, m in masks.items()]
        before = _norms(chosen)
        penalty = GrowingPenalty(chosen, cfg.delta_lambda, cfg.update_interval, cfg.lambda_max)
        reg = min(share, penalty.steps_to_ceiling)  # until the ceiling or the end of the share
        finetune = total - reg
        job.log(
            f"GReg ({cfg.mode}): {reg} regularisation steps (lambda +{cfg.delta_lambda:g} "
            f"every {cfg.update_interval}, ceiling {cfg.lambda_max:g}), then {finetune} fine-tuning"
        )
        train_steps(model, job, reg, penalty, "greg regularise")
        after = _norms(chosen)
        job.log(
            f"GReg: lambda {penalty.lam:.4g}; chosen-weight norm {before[0]:.4g} -> {after[0]:.4g}"
            f" (kept {before[1]:.4g} -> {after[1]:.4g})"
        )

        if structured:
            remove_channels(model, job.shape, drop)
        else:
            apply_masks(model, masks)
        train_steps(model, job, finetune, MaskHooks(model, masks, teacher=job.dense), "greg tune")

        info = {
            "mode": cfg.mode,
            "reg_steps": reg,
            "finetune_steps": finetune,
            "lambda_final": penalty.lam,
            "lambda_reached_ceiling": penalty.at_ceiling,
            "chosen_norm_before": before[0],
            "chosen_norm_after": after[0],
            "kept_norm_before": before[1],
            "kept_norm_after": after[1],
        }
        if structured:
            groups = find_groups(model, job.shape)
            channels = count_channels(model, groups)
            kept = sum(channels.get(g, 0) for g in dense) / sum(dense.values())
            info["channel_reduction"] = 1 - kept
            info["removed"] = {g: len(i) for g, i in drop.items()}
            return Outcome(
                model,
                structured=True,
                target_metric="channel_reduction",
                target=cfg.sparsity,
                channels=channels,
                info=info,
            )
        info["sparsity"] = sparsity(model)["global"]
        return Outcome(
            model, structured=False, target_metric="sparsity", target=cfg.sparsity, info=info
        )
