"""StructuredPruning: Anwar et al., "Structured Pruning of Deep Convolutional Neural
Networks" (ACM JETC 2017).

Pruning at three granularities: whole feature maps (channels), 2-D kernels, and
intra-kernel strided sparsity (every kernel of a layer keeps the same positions on a
stride, so the pattern can be computed as a strided convolution). Which units go is
chosen by a particle filter: each particle is a pruning mask, weighted by its
misclassification rate on validation data (weight proportional to exp(-error / T)),
then particles are resampled by weight and perturbed, for a few iterations; the best
particle seen wins. The first particle is the L1-ranked candidate, so the search
never does worse than plain L1 ranking on the validation batches. Then the network is
fine-tuned (with distillation from the dense model).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from deeplsp.errors import DeepLSPError
from deeplsp.masks import MaskHooks, Masks, apply_masks, sparsity
from deeplsp.methods import Batches, Method, Outcome, PruneJob, register
from deeplsp.structure import (
    ChannelGroup,
    count_channels,
    find_groups,
    remove_channels,
    round_channels,
)
from deeplsp.training import resolve_device, train

GRANULARITIES = ("channel", "kernel", "intra_kernel")
Particle = dict[str, Any]  # unit name -> bool drop mask (channel, kernel) or offset (intra)


@dataclass
class StructuredPruningConfig:
    ratio: float = 0.5  # fraction of channels / kernels / kernel positions pruned per layer
    granularity: Literal["channel", "kernel", "intra_kernel"] = "channel"
    particles: int = 8
    iterations: int = 3
    temperature: float = 0.05  # particle weight exp(-misclassification / temperature)
    perturb: float = 0.25  # fraction of a layer's pruned units swapped when perturbing

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise DeepLSPError(f"ratio must be in [0, 1) (got {self.ratio})")
        if self.granularity not in GRANULARITIES:
            raise DeepLSPError(
                f"granularity must be one of {', '.join(GRANULARITIES)} (got {self.granularity!r})"
            )
        if self.granularity == "intra_kernel" and self.ratio < 1 / 3:
            raise DeepLSPError(
                f"intra_kernel needs ratio >= 1/3 (a stride of at least 2; got {self.ratio})"
            )
        if self.particles < 1:
            raise DeepLSPError(f"particles must be >= 1 (got {self.particles})")
        if self.iterations < 1:
            raise DeepLSPError(f"iterations must be >= 1 (got {self.iterations})")
        if not self.temperature > 0:
            raise DeepLSPError(f"temperature must be > 0 (got {self.temperature})")
        if not 0 < self.perturb <= 1:
            raise DeepLSPError(f"perturb must be in (0, 1] (got {self.perturb})")


@torch.no_grad()
def misclassification(model: nn.Module, batches: Batches) -> float:
    """Top-1 error on the validation batches: the particle filter's observation."""
    model.eval()
    device = next(model.parameters()).device
    wrong = total = 0
    for images, labels in batches:
        pred = model(images.to(device)).argmax(1).cpu()
        wrong += int((pred != labels).sum())
        total += labels.numel()
    if total == 0:
        raise DeepLSPError("StructuredPruning needs validation batches (job.val is empty)")
    return wrong / total


# Candidates: per unit set (a channel group or a conv layer), a bool "drop" mask.


def _lowest(scores: torch.Tensor, n_drop: int) -> torch.Tensor:
    drop = torch.zeros(scores.numel(), dtype=torch.bool)
    drop[torch.argsort(scores.flatten().cpu(), stable=True)[:n_drop]] = True
    return drop


def channel_scores(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """L1 norm of each feature map's filters (summed over coupled producers)."""
    modules = dict(model.named_modules())
    return {
        g.id: sum(modules[n].weight.detach().abs().flatten(1).sum(1).cpu() for n in g.outputs)
        for g in groups
    }


def kernel_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """L1 norm of every 2-D kernel (out, in) of every convolution."""
    return {
        n: m.weight.detach().abs().sum((2, 3)).cpu()
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }


def perturb_drop(
    drop: torch.Tensor, scores: torch.Tensor, fraction: float, gen: torch.Generator
) -> torch.Tensor:
    """Swap some pruned units for kept ones, favouring kept units of low L1 (the search
    stays around the L1 candidate)."""
    dropped = drop.nonzero().flatten()
    kept = (~drop).nonzero().flatten()
    n = min(max(1, round(fraction * dropped.numel())), dropped.numel(), kept.numel())
    if n == 0:
        return drop
    out = drop.clone()
    restore = dropped[torch.randperm(dropped.numel(), generator=gen)[:n]]
    rank = torch.argsort(torch.argsort(scores.flatten()[kept], stable=True))
    chosen = kept[torch.multinomial(1.0 / (1.0 + rank.float()), n, generator=gen)]
    out[restore] = False
    out[chosen] = True
    return out


def stride_of(ratio: float) -> int:
    """Intra-kernel stride: keep one kernel position in `stride` (ratio 0.5 -> 2)."""
    return max(2, round(1 / (1 - ratio)))


def strided_pattern(kh: int, kw: int, stride: int, offset: int) -> torch.Tensor:
    """Keep mask of a kh x kw kernel: positions p (row-major) with p % stride == offset.

    A 3x3 kernel with stride 2 keeps the corners and centre (offset 0) or the edges (1).
    """
    return (torch.arange(kh * kw) % stride == offset).float().view(kh, kw)


def strided_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Convolutions with kernels larger than 1x1: the ones with intra-kernel structure."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size[0] * m.kernel_size[1] > 1
    }


def intra_masks(model: nn.Module, offsets: dict[str, int], stride: int) -> Masks:
    layers = strided_layers(model)
    masks = {}
    for name, off in offsets.items():
        w = layers[name].weight
        pattern = strided_pattern(w.shape[2], w.shape[3], stride, off)
        masks[name] = pattern.to(w.device).expand_as(w).contiguous()
    return masks


def intra_candidate(model: nn.Module, stride: int) -> dict[str, int]:
    """Per layer, the offset whose kept positions carry the most L1 weight."""
    best = {}
    for name, m in strided_layers(model).items():
        w = m.weight.detach().abs().sum((0, 1)).cpu()
        totals = [float((w * strided_pattern(*w.shape, stride, o)).sum()) for o in range(stride)]
        best[name] = max(range(stride), key=lambda o, t=totals: t[o])
    return best


@torch.no_grad()
def zero_channels(model: nn.Module, groups: list[ChannelGroup], drop: Particle) -> None:
    """Silence feature maps exactly as removing them would: zero their filters, biases
    and BatchNorm scale and shift, so every producer outputs 0 on those channels."""
    modules = dict(model.named_modules())
    for g in groups:
        idx = drop[g.id].nonzero().flatten()
        if idx.numel() == 0:
            continue
        for name in (*g.outputs, *g.norms):
            m = modules[name]
            i = idx.to(m.weight.device)
            m.weight[i] = 0
            if getattr(m, "bias", None) is not None:
                m.bias[i] = 0


def kernel_masks(model: nn.Module, drop: Particle) -> Masks:
    layers = dict(model.named_modules())
    masks = {}
    for name, d in drop.items():
        w = layers[name].weight
        keep = (~d).float().view(w.shape[0], w.shape[1], 1, 1).to(w.device)
        masks[name] = keep.expand_as(w).contiguous()
    return masks


def particle_search(
    base: Particle,
    perturb: Callable[[Particle], Particle],
    score: Callable[[Particle], float],
    cfg: StructuredPruningConfig,
    gen: torch.Generator,
    log: Callable[[str], None],
) -> tuple[Particle, float, list[list[float]]]:
    """Sequential importance resampling over pruning masks; returns the best particle,
    its validation error, and every particle's error per iteration."""
    particles = [base] + [perturb(base) for _ in range(cfg.particles - 1)]
    history: list[list[float]] = []
    best, best_err = base, math.inf
    for it in range(cfg.iterations):
        errors = [score(p) for p in particles]
        history.append(errors)
        for p, e in zip(particles, errors, strict=True):
            if e < best_err:
                best, best_err = p, e
        log(
            f"StructuredPruning: iteration {it + 1}/{cfg.iterations}: errors "
            f"{min(errors):.4f}..{max(errors):.4f}, best so far {best_err:.4f}"
        )
        if it + 1 == cfg.iterations:
            break
        weights = torch.softmax(-torch.tensor(errors) / cfg.temperature, 0)
        picks = torch.multinomial(weights, cfg.particles, replacement=True, generator=gen)
        particles = [perturb(particles[i]) for i in picks.tolist()]
    return best, best_err, history


def _weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))


def _zeros(masks: Masks) -> int:
    return sum(int((m == 0).sum()) for m in masks.values())


class _Search:
    """The particle filter bound to one job: particles are scored on a scratch copy of
    the dense weights, so the model being pruned is untouched until the best is chosen."""

    def __init__(self, job: PruneJob, cfg: StructuredPruningConfig, model: nn.Module) -> None:
        self.job, self.cfg, self.model = job, cfg, model
        self.gen = torch.Generator().manual_seed(job.seed)
        self.scratch = copy.deepcopy(model)
        self.state = {k: v.clone() for k, v in model.state_dict().items()}

    def error(self, apply: Callable[[nn.Module], None]) -> float:
        """A particle's validation error: the dense weights with its mask applied."""
        self.scratch.load_state_dict(self.state)
        apply(self.scratch)
        return misclassification(self.scratch, self.job.val)

    def run(
        self,
        base: Particle,
        perturb: Callable[[Particle], Particle],
        apply: Callable[[nn.Module, Particle], None],
    ) -> tuple[Particle, dict]:
        best, err, history = particle_search(
            base,
            perturb,
            lambda p: self.error(lambda m: apply(m, p)),
            self.cfg,
            self.gen,
            self.job.log,
        )
        info = {
            "granularity": self.cfg.granularity,
            "ratio": self.cfg.ratio,
            "dense_val_error": misclassification(self.model, self.job.val),
            "l1_candidate_val_error": history[0][0],
            "best_val_error": err,
            "particle_errors": history,  # per iteration, every particle's error
        }
        return best, info


@register
class StructuredPruning(Method):
    name = "StructuredPruning"
    description = (
        "Anwar et al. ACM JETC 2017: channel, kernel and intra-kernel strided pruning, "
        "masks chosen by a particle filter on validation error"
    )
    kind = "structured"
    Config = StructuredPruningConfig

    def run(self, job: PruneJob, cfg: StructuredPruningConfig) -> Outcome:
        model = job.copy_dense().to(resolve_device(job.train_cfg.device))
        search = _Search(job, cfg, model)
        if cfg.granularity == "channel":
            return self._channels(job, cfg, model, search)
        if cfg.granularity == "kernel":
            return self._kernels(job, cfg, model, search)
        return self._intra(job, cfg, model, search)

    def _channels(
        self, job: PruneJob, cfg: StructuredPruningConfig, model: nn.Module, search: _Search
    ) -> Outcome:
        groups = find_groups(model, job.shape)
        scores = channel_scores(model, groups)
        sizes = {g.id: g.channels for g in groups}
        base = {
            g: _lowest(scores[g], c - round_channels(c, 1 - cfg.ratio)) for g, c in sizes.items()
        }

        def perturb(p: Particle) -> Particle:
            return {u: perturb_drop(d, scores[u], cfg.perturb, search.gen) for u, d in p.items()}

        best, info = search.run(base, perturb, lambda m, p: zero_channels(m, groups, p))
        remove_channels(
            model, job.shape, {g: d.nonzero().flatten().tolist() for g, d in best.items()}
        )
        kept = count_channels(model, groups)
        info["channel_reduction"] = 1 - sum(kept.values()) / sum(sizes.values())
        info["channels_before"] = sizes
        _finetune(job, model, {}, "structured-channel-ft")
        return Outcome(
            model,
            structured=True,
            target_metric="channel_reduction",
            target=cfg.ratio,
            exact=True,
            channels=kept,
            info=info,
        )

    def _kernels(
        self, job: PruneJob, cfg: StructuredPruningConfig, model: nn.Module, search: _Search
    ) -> Outcome:
        scores = kernel_scores(model)
        base = {n: _lowest(s, round(cfg.ratio * s.numel())) for n, s in scores.items()}

        def perturb(p: Particle) -> Particle:
            return {u: perturb_drop(d, scores[u], cfg.perturb, search.gen) for u, d in p.items()}

        best, info = search.run(base, perturb, lambda m, p: apply_masks(m, kernel_masks(m, p)))
        masks = kernel_masks(model, best)
        # `ratio` of every conv's kernels, linear layers dense: the plan fixes the sparsity.
        target = _zeros(masks) / _weights(model)
        _finetune(job, model, masks, "structured-kernel-ft")
        info["sparsity"] = sparsity(model)["global"]
        return Outcome(model, structured=False, target_metric="sparsity", target=target, info=info)

    def _intra(
        self, job: PruneJob, cfg: StructuredPruningConfig, model: nn.Module, search: _Search
    ) -> Outcome:
        stride = stride_of(cfg.ratio)
        layers = strided_layers(model)
        names = sorted(layers)

        def perturb(p: Particle) -> Particle:
            """Re-draw the offset of a random subset of layers (at least one)."""
            out = dict(p)
            flip = torch.rand(len(names), generator=search.gen) < cfg.perturb
            if names and not flip.any():
                flip[int(torch.randint(len(names), (1,), generator=search.gen))] = True
            for name, f in zip(names, flip.tolist(), strict=True):
                if f:
                    out[name] = int(torch.randint(stride, (1,), generator=search.gen))
            return out

        best, info = search.run(
            intra_candidate(model, stride),
            perturb,
            lambda m, p: apply_masks(m, intra_masks(m, p, stride)),
        )
        masks = intra_masks(model, best, stride)
        # A stride keeps 1 position in `stride` of the kxk kernels; which positions the
        # offsets keep changes the count by one per kernel (4 or 5 of 9), so inexact.
        strided = sum(m.weight.numel() for m in layers.values())
        target = (1 - 1 / stride) * strided / _weights(model)
        _finetune(job, model, masks, "structured-intra-ft")
        info.update(
            stride=stride,
            offsets=best,
            pattern_sparsity=_zeros(masks) / max(strided, 1),
            sparsity=sparsity(model)["global"],
        )
        return Outcome(
            model,
            structured=False,
            target_metric="sparsity",
            target=target,
            exact=False,
            info=info,
        )


def _finetune(job: PruneJob, model: nn.Module, masks: Masks, desc: str) -> None:
    """Fine-tune with distillation from the dense model, masked weights kept at zero."""
    apply_masks(model, masks)
    train(model, job.train_loader, job.train_cfg, MaskHooks(model, masks, job.dense), desc)
    apply_masks(model, masks)
