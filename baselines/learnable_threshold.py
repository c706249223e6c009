"""LearnableThreshold: Kusupati et al., "Soft Threshold Weight Reparameterization for
Learnable Sparsity" (STR), ICML 2020.

Every conv/linear weight is used through a soft threshold with a learnable
per-layer parameter s:  W_eff = sign(W) * relu(|W| - sigmoid(s)).  Weights
under the threshold are exactly zero in the forward pass and get no task
gradient; weight decay on s pulls s up (towards 0), so thresholds rise and
sparsity emerges during training, at a per-layer level the training itself
chooses. Sparsity is therefore not set, only steered: thresholds stop rising
once the global sparsity reaches the target, and the gap is reported.

Budget aid (documented deviation): the paper trains for ~100 epochs with
s_init around -3 to -10 and the weights' weight decay on s. A short budget
never gets there, so s has its own optimizer (SGD, `s_lr`, `s_momentum`,
`s_weight_decay`, on the same cosine schedule as the weights), starts at
s_init = -5 (threshold 0.0067; -10 gives 4.5e-5, effectively no threshold),
and its weight decay by default comes from the budget: decay alone would carry
s from s_init to s_init / 4 (threshold 0.22, above almost every trained weight)
within `ramp_fraction` of the steps, so the target is met part-way through and
the rest of the budget trains at fixed thresholds. With `finalize="cut"` a
global magnitude cut tops a short run up to the target (off by default, and
reported in `info` when used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from baselines._budget import total_steps, train_steps
from deeplsp.errors import DeepLSPError
from deeplsp.masks import apply_masks, magnitude_scores, masks_from_scores, prunable_layers
from deeplsp.masks import sparsity as sparsity_of
from deeplsp.methods import Method, Outcome, PruneJob, register
from deeplsp.training import resolve_device


@dataclass
class LearnableThresholdConfig:
    target_sparsity: float = 0.7  # thresholds stop rising once global sparsity reaches it
    s_init: float = -5.0  # initial threshold parameter: threshold sigmoid(-5) = 0.0067
    s_lr: float | None = None  # None: the job's learning rate
    s_weight_decay: float | None = None  # None: derived from the budget (module docstring)
    s_momentum: float = 0.9
    ramp_fraction: float = 0.5  # share of the budget the derived weight decay plans for
    finalize: Literal["none", "cut"] = "none"  # "cut": magnitude cut up to the target at the end

    def __post_init__(self) -> None:
        if not 0 < self.target_sparsity < 1:
            raise DeepLSPError(f"target_sparsity must be in (0, 1) (got {self.target_sparsity})")
        if not math.isfinite(self.s_init) or self.s_init >= 0:
            raise DeepLSPError(f"s_init must be < 0 (got {self.s_init})")
        if self.s_lr is not None and not self.s_lr > 0:
            raise DeepLSPError(f"s_lr must be > 0 (got {self.s_lr})")
        if self.s_weight_decay is not None and self.s_weight_decay < 0:
            raise DeepLSPError(f"s_weight_decay must be >= 0 (got {self.s_weight_decay})")
        if not 0 <= self.s_momentum < 1:
            raise DeepLSPError(f"s_momentum must be in [0, 1) (got {self.s_momentum})")
        if not 0 < self.ramp_fraction <= 1:
            raise DeepLSPError(f"ramp_fraction must be in (0, 1] (got {self.ramp_fraction})")
        if self.finalize not in ("none", "cut"):
            raise DeepLSPError(f"finalize must be none or cut (got {self.finalize!r})")


class SoftThreshold(nn.Module):
    """W -> sign(W) * relu(|W| - sigmoid(s)). `s` is a plain tensor, not a registered
    Parameter, so the shared training loop's optimizer leaves it to `ThresholdHooks`."""

    def __init__(self, s: torch.Tensor) -> None:
        super().__init__()
        self.s = s

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.sign(w) * torch.relu(w.abs() - torch.sigmoid(self.s))


def auto_weight_decay(
    s_init: float, s_lr: float, momentum: float, steps: int, fraction: float
) -> float:
    """The weight decay on s that alone takes s from s_init to s_init / 4 within `fraction`
    of `steps` cosine-scheduled SGD steps: s shrinks by exp(-wd / (1 - momentum) * sum(lr))."""
    r = fraction
    lr_sum = s_lr * max(steps, 1) * (r / 2 + math.sin(math.pi * r) / (2 * math.pi))
    return math.log(4.0) * (1 - momentum) / lr_sum


class ThresholdHooks:
    """Steps the thresholds with their own optimizer after each weight step, while the global
    sparsity is under the target (STR's early stop: thresholds stop rising there)."""

    def __init__(
        self,
        originals: dict[str, torch.Tensor],
        s: dict[str, torch.Tensor],
        lr: float,
        weight_decay: float,
        momentum: float,
        steps: int,
        target: float,
    ) -> None:
        self.originals, self.s = originals, s
        self.lr, self.steps, self.target = lr, max(steps, 1), target
        self.opt = torch.optim.SGD(
            list(s.values()), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        self.step = 0
        self.reached_at: int | None = None  # first step at which the target was met
        self.s_steps = 0  # threshold updates taken

    @torch.no_grad()
    def sparsity(self) -> float:
        zeros = sum((w.abs() <= torch.sigmoid(self.s[n])).sum() for n, w in self.originals.items())
        total = sum(w.numel() for w in self.originals.values())
        return int(zeros) / max(total, 1)  # one device sync per step

    def extra_loss(self, model: nn.Module, images: torch.Tensor, logits: torch.Tensor):
        return None

    def after_step(self, model: nn.Module) -> None:
        self.step += 1
        if self.sparsity() < self.target:
            scale = 0.5 * (1 + math.cos(math.pi * min(self.step, self.steps) / self.steps))
            for group in self.opt.param_groups:
                group["lr"] = self.lr * scale
            self.opt.step()
            self.s_steps += 1
        elif self.reached_at is None:
            self.reached_at = self.step
        self.opt.zero_grad(set_to_none=True)


@register
class LearnableThreshold(Method):
    name = "LearnableThreshold"
    description = "Kusupati et al. ICML 2020 (STR): learnable soft thresholds, emergent sparsity"
    kind = "unstructured"
    Config = LearnableThresholdConfig

    def run(self, job: PruneJob, cfg: LearnableThresholdConfig) -> Outcome:
        device = resolve_device(job.train_cfg.device)
        model = job.copy_dense().to(device)
        steps = total_steps(job)
        s_lr = cfg.s_lr if cfg.s_lr is not None else job.train_cfg.lr
        wd = cfg.s_weight_decay
        if wd is None:
            wd = auto_weight_decay(cfg.s_init, s_lr, cfg.s_momentum, steps, cfg.ramp_fraction)
        layers = prunable_layers(model)
        s = {n: torch.tensor(cfg.s_init, device=device, requires_grad=True) for n in layers}
        for name, layer in layers.items():
            parametrize.register_parametrization(layer, "weight", SoftThreshold(s[name]))
        originals = {n: m.parametrizations.weight.original for n, m in layers.items()}
        hooks = ThresholdHooks(originals, s, s_lr, wd, cfg.s_momentum, steps, cfg.target_sparsity)
        start = hooks.sparsity()
        job.log(
            f"STR: {steps} steps, thresholds from {1 / (1 + math.exp(-cfg.s_init)):.3g} "
            f"(sparsity {start:.3f}), s lr {s_lr:g}, s weight decay {wd:.4g}, target "
            f"{cfg.target_sparsity:g}"
        )
        try:
            train_steps(model, job, steps, hooks, "str")
        finally:
            with torch.no_grad():
                thresholds = {n: float(torch.sigmoid(v)) for n, v in s.items()}
            for layer in layers.values():  # a plain model: the thresholded weights, exact zeros
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)

        achieved = sparsity_of(model)["global"]
        info = {
            "target_sparsity": cfg.target_sparsity,
            "achieved_sparsity": achieved,
            "gap": achieved - cfg.target_sparsity,
            "sparsity_at_start": start,
            "reached_at_step": hooks.reached_at,
            "threshold_updates": hooks.s_steps,
            "steps": steps,
            "s_lr": s_lr,
            "s_weight_decay": wd,
            "s_init": cfg.s_init,
            "thresholds": thresholds,
            "finalize": cfg.finalize,
        }
        if cfg.finalize == "cut" and achieved < cfg.target_sparsity:
            masks = masks_from_scores(magnitude_scores(model), cfg.target_sparsity, "global")
            apply_masks(model, masks)  # existing zeros score lowest: they stay zero
            info["cut_applied"] = True
            info["sparsity_before_cut"] = achieved
            info["achieved_sparsity"] = sparsity_of(model)["global"]
            info["gap"] = info["achieved_sparsity"] - cfg.target_sparsity
            job.log(f"STR: finalize=cut raised sparsity {achieved:.3f} -> {cfg.target_sparsity:g}")
        else:
            info["cut_applied"] = False
        job.log(f"STR: sparsity {info['achieved_sparsity']:.3f} (gap {info['gap']:+.3f})")
        return Outcome(
            model,
            structured=False,
            target_metric="sparsity",
            target=cfg.target_sparsity,
            exact=False,
            info=info,
        )
