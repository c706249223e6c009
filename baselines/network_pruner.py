"""NetworkPruner: Han et al. 2015, "Learning both Weights and Connections for Efficient
Neural Networks" (NeurIPS).

Train, prune the small-magnitude connections, retrain with the pruned connections held at
zero, and repeat, each round pruning more, until the target sparsity. Han picks a layer's
threshold as a quality parameter times the standard deviation of its weights; here the
threshold of each round is the one that makes the layer reach that round's sparsity
exactly (scope "layer"), or one threshold over all layers (scope "global"). The quality
parameter that threshold corresponds to is reported in `info["quality"]`.

Schedule: round i of n prunes to sparsity * i / n (linear), so the last round reaches the
target. The training budget (job.train_cfg.epochs) is split evenly over the rounds, the
remainder going to the last rounds: with fewer epochs than rounds, the early rounds prune
without retraining and the last ones retrain one epoch each, so any budget of at least one
epoch always retrains at the final sparsity. A budget of zero epochs prunes only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from deeplsp.errors import DeepLSPError
from deeplsp.masks import (
    MaskHooks,
    Masks,
    apply_masks,
    masks_from_scores,
    prunable_layers,
    sparsity,
)
from deeplsp.methods import Method, Outcome, PruneJob, register
from deeplsp.training import train


@dataclass
class Config:
    sparsity: float = 0.5  # fraction of conv/linear weights set to zero at the end
    iterations: int = 3  # prune + retrain rounds
    scope: Literal["layer", "global"] = "layer"  # per-layer threshold (Han) or one global one

    def __post_init__(self) -> None:
        if not 0 < self.sparsity < 1:
            raise DeepLSPError(f"sparsity must be in (0, 1) (got {self.sparsity})")
        if self.iterations < 1:
            raise DeepLSPError(f"iterations must be >= 1 (got {self.iterations})")
        if self.scope not in ("layer", "global"):
            raise DeepLSPError(f"scope must be 'layer' or 'global' (got {self.scope!r})")


def schedule(target: float, iterations: int) -> list[float]:
    """Each round's sparsity: linear steps ending at the target."""
    return [target * (i + 1) / iterations for i in range(iterations)]


def split_epochs(total: int, parts: int) -> list[int]:
    """An even split of the budget, the remainder to the last rounds (which prune most)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i >= parts - extra else 0) for i in range(parts)]


def _thresholds(model: torch.nn.Module, masks: Masks) -> tuple[dict, dict]:
    """Per layer: the largest magnitude pruned (Han's threshold) and that threshold in
    units of the layer's weight standard deviation (Han's quality parameter)."""
    thresholds, quality = {}, {}
    for name, m in prunable_layers(model).items():
        w = m.weight.detach().abs()
        pruned = w[masks[name] == 0]
        t = float(pruned.max()) if pruned.numel() else 0.0
        std = float(m.weight.detach().std()) if m.weight.numel() > 1 else 0.0
        thresholds[name] = t
        quality[name] = t / std if std > 0 else 0.0
    return thresholds, quality


@register
class NetworkPruner(Method):
    name = "NetworkPruner"
    description = (
        "Han et al. 2015 (Learning both Weights and Connections): iterative magnitude "
        "pruning with masked retraining"
    )
    kind = "unstructured"
    Config = Config

    def run(self, job: PruneJob, cfg: Config) -> Outcome:
        model = job.copy_dense()
        layers = prunable_layers(model)
        masks: Masks = {n: torch.ones_like(m.weight) for n, m in layers.items()}
        steps = schedule(cfg.sparsity, cfg.iterations)
        epochs = split_epochs(job.train_cfg.epochs, cfg.iterations)
        thresholds: dict = {}
        quality: dict = {}
        for i, (target, n_epochs) in enumerate(zip(steps, epochs, strict=True)):
            # Pruned weights score -1 so every round's mask is a subset of the last.
            scores = {
                n: torch.where(masks[n].to(m.weight.device) > 0, m.weight.detach().abs(), -1.0)
                for n, m in layers.items()
            }
            masks = masks_from_scores(scores, target, cfg.scope)
            thresholds, quality = _thresholds(model, masks)
            apply_masks(model, masks)
            job.log(
                f"NetworkPruner round {i + 1}/{cfg.iterations}: sparsity {target:.3f}, "
                f"retrain {n_epochs} epoch(s)"
            )
            if n_epochs > 0:
                train(
                    model,
                    job.train_loader,
                    dataclasses.replace(job.train_cfg, epochs=n_epochs),
                    MaskHooks(model, masks, teacher=job.dense),
                    desc=f"NetworkPruner {i + 1}/{cfg.iterations}",
                )
        achieved = sparsity(model)
        return Outcome(
            model=model.cpu().eval(),
            structured=False,
            target_metric="sparsity",
            target=cfg.sparsity,
            exact=True,
            info={
                "scope": cfg.scope,
                "schedule": steps,
                "epochs_per_round": epochs,
                "thresholds": thresholds,
                "quality": quality,
                "sparsity": achieved["global"],
                "per_layer": achieved["per_layer"],
            },
        )
