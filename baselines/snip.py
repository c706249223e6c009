"""SNIP: Lee et al. ICLR 2019, "SNIP: Single-shot Network Pruning based on Connection
Sensitivity".

Prune once, at initialisation, before any training: each connection c_j (a 0/1 gate on
weight w_j) gets the sensitivity |dL/dc_j| at c = 1, which is |w_j * dL/dw_j|, computed on
one mini-batch (or `n_batches`) of real training data. The sensitivities are normalised to
sum to one, the top (1 - sparsity) fraction over all layers is kept (one global cut), and
the sparse network is trained from scratch for the job's whole training budget with the
pruned connections held at zero. No distillation from the trained dense model: SNIP
trains the pruned network as a normal network.

The initialisation is the model's own (`job.fresh_model()`), not the paper's variance
scaling; the paper's point is that the criterion is robust to it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from deeplsp.errors import DeepLSPError
from deeplsp.masks import MaskHooks, apply_masks, masks_from_scores, prunable_layers, sparsity
from deeplsp.methods import Batches, Method, Outcome, PruneJob, register
from deeplsp.training import resolve_device, train


@dataclass
class Config:
    sparsity: float = 0.5  # fraction of conv/linear weights pruned at initialisation
    n_batches: int = 1  # calibration batches the sensitivity is computed on

    def __post_init__(self) -> None:
        if not 0 < self.sparsity < 1:
            raise DeepLSPError(f"sparsity must be in (0, 1) (got {self.sparsity})")
        if self.n_batches < 1:
            raise DeepLSPError(f"n_batches must be >= 1 (got {self.n_batches})")


def connection_sensitivity(
    model: nn.Module, batches: Batches, device: torch.device
) -> dict[str, torch.Tensor]:
    """Normalised |g * w| with g = dL/dc at c = 1, L the mean loss over `batches`.

    Computed on a copy in training mode (batch statistics, as the network is about to be
    trained), so the model's BatchNorm running statistics stay at their initial values.
    """
    if not batches:
        raise DeepLSPError("SNIP needs at least one calibration batch; the job has none")
    work = copy.deepcopy(model).to(device).train()
    layers = prunable_layers(work)
    weights = [m.weight for m in layers.values()]
    grads = [torch.zeros_like(w) for w in weights]
    for images, labels in batches:
        loss = nn.functional.cross_entropy(work(images.to(device)), labels.to(device))
        for acc, g in zip(grads, torch.autograd.grad(loss, weights), strict=True):
            acc += g / len(batches)
    scores = [(w.detach() * g).abs() for w, g in zip(weights, grads, strict=True)]
    total = sum(float(s.sum()) for s in scores)
    if total > 0:
        scores = [s / total for s in scores]
    return dict(zip(layers, scores, strict=True))


@register
class SNIP(Method):
    name = "SNIP"
    description = (
        "Lee et al. ICLR 2019 (SNIP): connection sensitivity |g*w| at initialisation, "
        "one global cut, train the sparse network from scratch"
    )
    kind = "unstructured"
    Config = Config

    def run(self, job: PruneJob, cfg: Config) -> Outcome:
        device = resolve_device(job.train_cfg.device)
        model = job.fresh_model().to(device)
        batches = job.calib[: cfg.n_batches]
        scores = connection_sensitivity(model, batches, device)
        masks = masks_from_scores(scores, cfg.sparsity, "global")
        apply_masks(model, masks)
        achieved = sparsity(model)
        collapsed = [n for n, s in achieved["per_layer"].items() if s == 1.0]
        job.log(
            f"SNIP: kept {1 - cfg.sparsity:.3f} of the weights at initialisation "
            f"({len(batches)} batch(es)); train from scratch {job.train_cfg.epochs} epoch(s)"
        )
        if collapsed:
            job.log(f"SNIP: layers pruned entirely: {', '.join(collapsed)}")
        if job.train_cfg.epochs > 0:
            train(model, job.train_loader, job.train_cfg, MaskHooks(model, masks), desc="SNIP")
        achieved = sparsity(model)
        return Outcome(
            model=model.cpu().eval(),
            structured=False,
            target_metric="sparsity",
            target=cfg.sparsity,
            exact=True,
            info={
                "calib_batches": len(batches),
                "from_scratch_epochs": job.train_cfg.epochs,
                "collapsed_layers": collapsed,
                "sparsity": achieved["global"],
                "per_layer": achieved["per_layer"],
            },
        )
