"""LossModelPruner: prune the weights whose removal changes the loss least, by the first-order
Taylor expansion of the loss (Molchanov et al. 2017/2019, "Importance Estimation for
Neural Network Pruning"), with magnitude and random importance as controls.

Importance of weight w: |w * dL/dw| (the first-order change of the loss when w is set to
zero), accumulated over the calibration batches; or |w|; or uniform random. One global
threshold zeroes the lowest-importance `sparsity` fraction of all conv/linear weights
(exactly), then the masked network is fine-tuned for the job's whole training budget with
the masks enforced after every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from deeplsp.errors import DeepLSPError
from deeplsp.masks import (
    MaskHooks,
    apply_masks,
    magnitude_scores,
    masks_from_scores,
    prunable_layers,
    sparsity,
)
from deeplsp.methods import Batches, Method, Outcome, PruneJob, register
from deeplsp.modes import eval_mode
from deeplsp.training import resolve_device, train

IMPORTANCES = ("taylor", "magnitude", "random")


@dataclass
class Config:
    sparsity: float = 0.2  # fraction of conv/linear weights set to zero
    importance: Literal["taylor", "magnitude", "random"] = "taylor"
    n_batches: int | None = None  # calibration batches for Taylor scores (None: all)

    def __post_init__(self) -> None:
        if not 0 < self.sparsity < 1:
            raise DeepLSPError(f"sparsity must be in (0, 1) (got {self.sparsity})")
        if self.importance not in IMPORTANCES:
            raise DeepLSPError(
                f"importance must be one of {', '.join(IMPORTANCES)} (got {self.importance!r})"
            )
        if self.n_batches is not None and self.n_batches < 1:
            raise DeepLSPError(f"n_batches must be >= 1 or none (got {self.n_batches})")


def taylor_scores(
    model: nn.Module, batches: Batches, device: torch.device
) -> dict[str, torch.Tensor]:
    """|w * dL/dw| per weight, summed over batches (abs per batch, as Molchanov accumulates).

    Eval mode: BatchNorm uses its running statistics and they are left untouched.
    """
    if not batches:
        raise DeepLSPError("Taylor importance needs calibration batches; the job has none")
    layers = prunable_layers(model)
    weights = [m.weight for m in layers.values()]
    scores = [torch.zeros_like(w) for w in weights]
    model.to(device)
    with eval_mode(model):
        for images, labels in batches:
            logits = model(images.to(device))
            loss = nn.functional.cross_entropy(logits, labels.to(device))
            grads = torch.autograd.grad(loss, weights)
            for s, w, g in zip(scores, weights, grads, strict=True):
                s += (w.detach() * g).abs()
    return dict(zip(layers, scores, strict=True))


def importance_scores(
    model: nn.Module, kind: str, batches: Batches, device: torch.device, seed: int
) -> dict[str, torch.Tensor]:
    if kind == "taylor":
        return taylor_scores(model, batches, device)
    if kind == "magnitude":
        return magnitude_scores(model)
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.weight.shape, generator=gen) for n, m in prunable_layers(model).items()}


def threshold(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> float:
    """The global cut: the highest importance that was pruned."""
    pruned = [s[masks[n].to(s.device) == 0] for n, s in scores.items()]
    return max((float(p.max()) for p in pruned if p.numel()), default=0.0)


@register
class LossModelPruner(Method):
    name = "LossModelPruner"
    description = (
        "Molchanov et al. 2017/2019: first-order Taylor (or magnitude, random) weight "
        "importance, one global threshold, masked fine-tuning"
    )
    kind = "unstructured"
    Config = Config

    def run(self, job: PruneJob, cfg: Config) -> Outcome:
        model = job.copy_dense()
        device = resolve_device(job.train_cfg.device)
        batches = job.calib if cfg.n_batches is None else job.calib[: cfg.n_batches]
        scores = importance_scores(model, cfg.importance, batches, device, job.seed)
        masks = masks_from_scores(scores, cfg.sparsity, "global")
        cut = threshold(scores, masks)
        apply_masks(model, masks)
        job.log(
            f"LossModelPruner: {cfg.importance} importance, global cut at {cut:.3g} "
            f"-> sparsity {cfg.sparsity:.3f}; fine-tune {job.train_cfg.epochs} epoch(s)"
        )
        if job.train_cfg.epochs > 0:
            train(
                model,
                job.train_loader,
                job.train_cfg,
                MaskHooks(model, masks, teacher=job.dense),
                desc="LossModelPruner fine-tune",
            )
        achieved = sparsity(model)
        return Outcome(
            model=model.cpu().eval(),
            structured=False,
            target_metric="sparsity",
            target=cfg.sparsity,
            exact=True,
            info={
                "importance": cfg.importance,
                "calib_batches": len(batches) if cfg.importance == "taylor" else 0,
                "threshold": cut,
                "sparsity": achieved["global"],
                "per_layer": achieved["per_layer"],
            },
        )
