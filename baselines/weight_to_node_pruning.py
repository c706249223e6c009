"""WeightToNodePruning: probabilistic magnitude pruning forced to an exact per-layer ratio,
then removal of the nodes left without any incoming weight.

Per conv/linear layer of n weights, exactly k = round(sparsity * n) weights are drawn for
pruning, without replacement, with probability proportional to exp(-|w| / (T * mean|w|)):
a small weight is likely to go, a large one can still go (unlike a hard magnitude cut).
The draw is the Gumbel-top-k form of sequential sampling without replacement (the same
distribution as torch.multinomial(p, k, replacement=False), seeded the same way from the
job's seed, without its 2**24-category limit or its failure when exp() underflows).

A node is an output channel (a conv filter or a linear neuron). A node whose incoming
weights were all pruned is removed for real (structure.remove_channels) when its channel
is dead in every layer coupled to it (e.g. all convolutions added into the same residual
stream); otherwise it stays, zeroed, and is counted in info["dead_nodes"]. A removed node
may still have fed a constant (its BatchNorm shift or bias) forward: the masked fine-tuning
that follows (the job's whole budget, masks enforced after every step) absorbs that.

The per-layer ratio is exact before node removal. Removing a node also removes the weights
that read it in the next layers, so the remaining weights' zero fraction moves off the
target: when nodes are removed the outcome is marked inexact and both figures are reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deeplsp.errors import DeepLSPError
from deeplsp.masks import MaskHooks, Masks, apply_masks, masks_of, prunable_layers, sparsity
from deeplsp.methods import Method, Outcome, PruneJob, register
from deeplsp.structure import ChannelGroup, count_channels, find_groups, remove_channels
from deeplsp.training import train


@dataclass
class Config:
    sparsity: float = 0.5  # exact fraction of each layer's weights pruned
    temperature: float = 1.0  # in units of the layer's mean |w|; large: close to uniform
    remove_nodes: bool = True  # remove output channels left with no incoming weight

    def __post_init__(self) -> None:
        if not 0 < self.sparsity < 1:
            raise DeepLSPError(f"sparsity must be in (0, 1) (got {self.sparsity})")
        if not self.temperature > 0:
            raise DeepLSPError(f"temperature must be > 0 (got {self.temperature})")


def sample_prune(
    magnitude: torch.Tensor, k: int, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """Indices of k entries drawn without replacement with p ∝ exp(-|w| / (T mean|w|)).

    Gumbel-top-k: the k largest of log p + Gumbel noise are a sample without replacement
    from p (Plackett-Luce), computed in log space so no probability underflows.
    """
    a = magnitude.detach().flatten().float().cpu()
    logp = -a / (temperature * a.mean().clamp_min(1e-12))
    u = torch.rand(a.shape, generator=generator).clamp_min(1e-20)
    keys = logp - torch.log(-torch.log(u))
    return torch.topk(keys, k).indices


def probabilistic_masks(model: nn.Module, ratio: float, temperature: float, seed: int) -> Masks:
    """Exactly round(ratio * n) weights of every conv/linear layer drawn for pruning."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, m in prunable_layers(model).items():
        k = int(round(ratio * m.weight.numel()))
        mask = torch.ones(m.weight.numel())
        if k > 0:
            mask[sample_prune(m.weight.abs(), k, temperature, gen)] = 0.0
        masks[name] = mask.view_as(m.weight)
    return masks


def dead_rows(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel: True where every incoming weight is zero."""
    return (weight.detach().flatten(1) == 0).all(dim=1)


def removable_nodes(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, list[int]]:
    """Per group, the channels dead in every layer that outputs them (at least one kept)."""
    modules = dict(model.named_modules())
    drop = {}
    for g in groups:
        dead = torch.ones(g.channels, dtype=torch.bool)
        for name in g.outputs:
            w = modules[name].weight
            if w.shape[0] != g.channels:  # not a plain channel mapping: leave the group alone
                dead[:] = False
                break
            dead &= dead_rows(w).cpu()
        idxs = dead.nonzero().flatten().tolist()
        if len(idxs) == g.channels:
            idxs = idxs[:-1]  # a group cannot lose every channel
        if idxs:
            drop[g.id] = idxs
    return drop


def count_dead(model: nn.Module) -> dict[str, int]:
    counts = {n: int(dead_rows(m.weight).sum()) for n, m in prunable_layers(model).items()}
    return {n: c for n, c in counts.items() if c}


@register
class WeightToNodePruning(Method):
    name = "WeightToNodePruning"
    description = (
        "Probabilistic weight pruning (lower magnitude, more likely pruned) to an exact "
        "per-layer ratio, then removal of nodes with no incoming weight"
    )
    kind = "unstructured"
    Config = Config

    def run(self, job: PruneJob, cfg: Config) -> Outcome:
        model = job.copy_dense()
        masks = probabilistic_masks(model, cfg.sparsity, cfg.temperature, job.seed)
        apply_masks(model, masks)
        before = sparsity(model)
        groups = find_groups(model, job.shape)
        drop = removable_nodes(model, groups) if cfg.remove_nodes else {}
        weights_before = before["weights"]
        if drop:
            remove_channels(model, job.shape, drop)
        removed = sum(len(v) for v in drop.values())
        masks = masks_of(model)
        after = sparsity(model)
        dead = count_dead(model)
        job.log(
            f"WeightToNodePruning: pruned {cfg.sparsity:.3f} of every layer "
            f"(T={cfg.temperature}); removed {removed} node(s), {sum(dead.values())} dead "
            f"node(s) kept; fine-tune {job.train_cfg.epochs} epoch(s)"
        )
        if job.train_cfg.epochs > 0:
            train(
                model,
                job.train_loader,
                job.train_cfg,
                MaskHooks(model, masks, teacher=job.dense),
                desc="WeightToNodePruning fine-tune",
            )
        final = sparsity(model)
        zeros_after = int(round(after["global"] * after["weights"]))
        return Outcome(
            model=model.cpu().eval(),
            structured=False,
            target_metric="sparsity",
            target=cfg.sparsity,
            exact=removed == 0,
            channels=count_channels(model, groups) if removed else None,
            info={
                "temperature": cfg.temperature,
                "sparsity_before_removal": before["global"],
                "per_layer_before_removal": before["per_layer"],
                "nodes_removed": removed,
                "nodes_removed_by_group": {g: len(v) for g, v in drop.items()},
                "dead_nodes": sum(dead.values()),
                "dead_nodes_by_layer": dead,
                "weights_removed": weights_before - after["weights"],
                # removed weights counted as pruned, over the original weight count
                "equivalent_sparsity": (
                    (zeros_after + weights_before - after["weights"]) / weights_before
                ),
                "sparsity": final["global"],
                "per_layer": final["per_layer"],
            },
        )
