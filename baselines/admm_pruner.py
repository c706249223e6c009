"""ADMMPruner: Zhang et al., "A Systematic DNN Weight Pruning Framework using ADMM", ECCV 2018.

Pruning as constrained training: minimise loss(W) subject to every layer having
at most (1 - s) nonzero weights. ADMM splits it with an auxiliary copy Z_i of
each layer's weights and a scaled dual U_i:

    W-step: train on loss + sum_i rho/2 ||W_i - Z_i + U_i||^2   (`admm_interval` steps)
    Z-step: Z_i = projection of (W_i + U_i) onto the sparse set (keep the largest magnitudes)
    U-step: U_i += W_i - Z_i

The sparsity of the projection ramps up over `stages` (progressive ADMM), so
the weights are pulled towards sparsity gradually; then the smallest weights are
cut for real (per layer, exact) and the masked network is retrained with the
rest of the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
from deeplsp.training import resolve_device


@dataclass
class ADMMPrunerConfig:
    sparsity: float = 0.5  # of every conv/linear layer's weights
    rho: float = 1e-3  # the augmented Lagrangian's penalty
    admm_epochs_fraction: float = 0.5  # share of the budget spent in ADMM; the rest retrains
    stages: int = 3  # progressive schedule: sparsity * k / stages in stage k = 1..stages
    admm_interval: int | None = None  # steps per Z/U update; None: an epoch, or less so
    # that every stage gets at least 4 updates

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise DeepLSPError(f"sparsity must be in [0, 1) (got {self.sparsity})")
        if not self.rho > 0:
            raise DeepLSPError(f"rho must be > 0 (got {self.rho})")
        if not 0 < self.admm_epochs_fraction <= 1:
            raise DeepLSPError(
                f"admm_epochs_fraction must be in (0, 1] (got {self.admm_epochs_fraction})"
            )
        if self.stages < 1:
            raise DeepLSPError(f"stages must be >= 1 (got {self.stages})")
        if self.admm_interval is not None and self.admm_interval < 1:
            raise DeepLSPError(f"admm_interval must be >= 1 (got {self.admm_interval})")


def project(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Euclidean projection onto tensors with at most (1 - sparsity) of their entries
    nonzero: keep the largest magnitudes (the paper's Z-step)."""
    keep = masks_from_scores({"w": w.abs()}, sparsity, scope="layer")["w"]
    return w * keep.to(w.dtype)


class ADMMHooks:
    """The W-step's penalty and, every `interval` steps, the Z- and U-steps."""

    def __init__(
        self, model: nn.Module, rho: float, schedule: list[float], steps: int, interval: int
    ) -> None:
        self.weights = {n: m.weight for n, m in prunable_layers(model).items()}
        self.rho, self.schedule, self.steps, self.interval = rho, schedule, steps, interval
        self.step = 0
        with torch.no_grad():
            self.Z = {n: project(w.detach(), schedule[0]) for n, w in self.weights.items()}
            self.U = {n: torch.zeros_like(w) for n, w in self.weights.items()}
        self.history: list[dict] = []

    def target(self) -> float:
        """The projection's sparsity after `step` steps: stage k of the phase uses schedule[k]."""
        done = max(self.step - 1, 0)  # the step just taken, 0-based
        stage = min(len(self.schedule) - 1, done * len(self.schedule) // max(self.steps, 1))
        return self.schedule[stage]

    def extra_loss(self, model: nn.Module, images: torch.Tensor, logits: torch.Tensor):
        penalty = sum(((w - self.Z[n] + self.U[n]) ** 2).sum() for n, w in self.weights.items())
        return 0.5 * self.rho * penalty

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        self.step += 1
        if self.step % self.interval == 0 or self.step == self.steps:
            self.update()

    @torch.no_grad()
    def update(self) -> None:
        s = self.target()
        for n, w in self.weights.items():
            self.Z[n] = project(w + self.U[n], s)
            self.U[n] += w - self.Z[n]
        self.history.append({"step": self.step, "sparsity": s, "residual": self.residual()})

    @torch.no_grad()
    def residual(self) -> float:
        """||W - Z|| / ||W|| over all layers: zero when the weights satisfy the constraint."""
        diff = sum(float(((w - self.Z[n]) ** 2).sum()) for n, w in self.weights.items())
        norm = sum(float((w**2).sum()) for w in self.weights.values())
        return math.sqrt(diff / max(norm, 1e-30))


@torch.no_grad()
def cut_fraction(model: nn.Module, sparsity: float) -> float:
    """||W - proj(W)|| / ||W|| over all layers: how much of the weights a hard cut removes
    (ADMM's aim is to make this small before cutting)."""
    ws = [m.weight for m in prunable_layers(model).values()]
    cut = sum(float(((w - project(w, sparsity)) ** 2).sum()) for w in ws)
    return math.sqrt(cut / max(sum(float((w**2).sum()) for w in ws), 1e-30))


def schedule(target: float, stages: int) -> list[float]:
    return [target * (k + 1) / stages for k in range(stages)]


@register
class ADMMPruner(Method):
    name = "ADMMPruner"
    description = "Zhang et al. ECCV 2018: ADMM weight pruning, progressive sparsity, retrain"
    kind = "unstructured"
    Config = ADMMPrunerConfig

    def run(self, job: PruneJob, cfg: ADMMPrunerConfig) -> Outcome:
        model = job.copy_dense().to(resolve_device(job.train_cfg.device))
        admm, retrain = split_steps(total_steps(job), cfg.admm_epochs_fraction)
        stages = schedule(cfg.sparsity, cfg.stages)
        interval = cfg.admm_interval or max(1, min(len(job.train_loader), admm // (4 * cfg.stages)))
        dense_cut = cut_fraction(model, cfg.sparsity)
        hooks = ADMMHooks(model, cfg.rho, stages, admm, interval)
        job.log(
            f"ADMM: {admm} steps (rho {cfg.rho:g}, Z/U every {interval}, sparsity "
            f"{', '.join(f'{s:.3g}' for s in stages)}), then {retrain} masked retraining steps"
        )
        train_steps(model, job, admm, hooks, "admm")
        residual, cut = hooks.residual(), cut_fraction(model, cfg.sparsity)
        job.log(
            f"ADMM: relative residual ||W - Z|| / ||W|| = {residual:.4g}; the cut removes "
            f"{cut:.4g} of ||W|| (from the dense weights it would remove {dense_cut:.4g})"
        )

        masks = masks_from_scores(magnitude_scores(model), cfg.sparsity, scope="layer")
        apply_masks(model, masks)
        train_steps(model, job, retrain, MaskHooks(model, masks, teacher=job.dense), "admm retrain")
        history = hooks.history[:: math.ceil(len(hooks.history) / 50) or 1]  # a small record
        if hooks.history and history[-1] is not hooks.history[-1]:
            history.append(hooks.history[-1])
        return Outcome(
            model,
            structured=False,
            target_metric="sparsity",
            target=cfg.sparsity,
            info={
                "admm_steps": admm,
                "retrain_steps": retrain,
                "admm_interval": interval,
                "rho": cfg.rho,
                "schedule": stages,
                "residual_final": residual,
                "cut_fraction": cut,
                "cut_fraction_dense": dense_cut,
                "residual_history": history,
                "sparsity": sparsity(model)["global"],
            },
        )
