"""How much each channel group can lose, measured on real data.

For every group and candidate keep count, the calibration loss is measured
with the group's least important channels (the ones `prune_groups` would
remove) silenced: their outputs are zeroed after the last layer that produces
them (BatchNorm, or the conv/linear itself), which is exactly what removing
them does to every layer downstream. No model copy and no re-tracing per
candidate, so a full scan costs one forward pass of the calibration batches per
(group, candidate).

`measure_in_context` reads the same cuts inside another network (every other group cut
to a context, BatchNorm re-estimated): `--sensitivity context`.

Results are cached on disk, keyed by the weights, the calibration data and the
candidates, so a second run does not recompute them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from deeplsp.adaptive_bn import adapted_loss
from deeplsp.atomic import write_json
from deeplsp.structure import ChannelGroup
from deeplsp.training import progress


def _silence(module: nn.Module, channels: torch.Tensor):
    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        out = output.clone()
        out[:, channels] = 0
        return out

    return module.register_forward_hook(hook)


def _producers(group: ChannelGroup, modules: Mapping[str, nn.Module]) -> list[nn.Module]:
    """Where to zero the group's channels: every norm layer, and every output layer that
    is not followed by one of the group's norms (a conv feeding BN is covered by the BN)."""
    norm_inputs = set()
    names = list(modules)
    for norm in group.norms:
        idx = names.index(norm)
        # the layer just before a BN in module order is the conv it normalises
        prev = next((n for n in reversed(names[:idx]) if n in group.outputs), None)
        if prev is not None:
            norm_inputs.add(prev)
    chosen = [n for n in group.outputs if n not in norm_inputs] + list(group.norms)
    return [modules[n] for n in chosen]


@torch.no_grad()
def _loss(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    total, n = 0.0, 0
    for images, labels in batches:
        logits = model(images)
        total += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        n += labels.numel()
    return total / n


class _Cuts:
    """Silencing hooks per group: `set(g, keep)` makes group `g` behave as if it kept its
    `keep` most important channels."""

    def __init__(self, model: nn.Module, order: Mapping[str, list[int]]) -> None:
        self.modules, self.order = dict(model.named_modules()), order
        self.handles: dict[str, list] = {}

    def set(self, g: ChannelGroup, keep: int) -> None:
        for h in self.handles.pop(g.id, []):
            h.remove()
        if keep < g.channels:
            drop = torch.tensor(self.order[g.id][: g.channels - keep], dtype=torch.long)
            self.handles[g.id] = [_silence(m, drop) for m in _producers(g, self.modules)]

    def clear(self) -> None:
        for hs in self.handles.values():
            for h in hs:
                h.remove()
        self.handles.clear()


def measure_sensitivity(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    order: Mapping[str, list[int]],
    candidates: Mapping[str, Sequence[int]],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, dict[int, float]]:
    """Loss increase per group and keep count, on the calibration batches: each group cut
    with every other group whole (clamped at >= 0)."""
    model.eval()
    cuts = _Cuts(model, order)
    result: dict[str, dict[int, float]] = {g.id: {g.channels: 0.0} for g in groups}
    try:
        base = _loss(model, batches)
        work = [(g, k) for g in groups for k in candidates[g.id] if k != g.channels]
        for g, k in progress(work, "sensitivity"):
            cuts.set(g, k)
            result[g.id][k] = max(0.0, _loss(model, batches) - base)
            cuts.set(g, g.channels)
    finally:
        cuts.clear()
    return result


def context_losses(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    order: Mapping[str, list[int]],
    candidates: Mapping[str, Sequence[int]],
    context: Mapping[str, int],
    adapt: Sequence[tuple[torch.Tensor, torch.Tensor]],
    held_out: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, dict[int, float]]:
    """Adaptive-BN loss (`adaptive_bn.adapted_loss`) per group and keep count, with every
    other group cut to `context`: what removing those channels and re-estimating BatchNorm
    would read, without a model copy per candidate but the one adaptation makes."""
    model.eval()
    cuts = _Cuts(model, order)
    losses: dict[str, dict[int, float]] = {g.id: {} for g in groups}
    try:
        for g in groups:
            cuts.set(g, context[g.id])
        work = [(g, k) for g in groups for k in candidates[g.id]]
        for g, k in progress(work, "sensitivity in context"):
            cuts.set(g, k)
            losses[g.id][k] = adapted_loss(model, adapt, held_out)
            cuts.set(g, context[g.id])
    finally:
        cuts.clear()
    return losses


def measure_in_context(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    order: Mapping[str, list[int]],
    candidates: Mapping[str, Sequence[int]],
    context: Mapping[str, int],
    adapt: Sequence[tuple[torch.Tensor, torch.Tensor]],
    held_out: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, dict[int, float]]:
    """Loss per group and keep count in a network near the budget (`context_losses`),
    relative to the group's widest count there; a narrower count never reads cheaper than
    a wider one (the reading is noisy and a cut cannot help).

    Why: one group cut in the dense network reads what the others make up for. ResNet-18's
    layer-4 residual stream cut to 64 of 512 channels read 0.034 nats alone and 0.421 with
    every other group at half; the knapsack's networks that cut it so at 18-28% of the
    latency fine-tuned to 56-61%, those on the in-context table to 62-71%
    (bench/README.md, knapsack_family, session 18). Where the context network is near
    chance the differences vanish (MobileNetV3-L at 30%: the classifier read 0 at every
    count), so it is not the pipeline's default."""
    result: dict[str, dict[int, float]] = {}
    for gid, losses in context_losses(
        model, groups, order, candidates, context, adapt, held_out
    ).items():
        floor, worst, table = losses[max(losses)], 0.0, {}
        for k in sorted(losses, reverse=True):
            worst = max(worst, losses[k] - floor)
            table[k] = worst
        result[gid] = table
    return result


def cache_key(
    model: nn.Module,
    batches: Sequence,
    candidates: Mapping,
    importance: str,
) -> str:
    """Hash of everything the scan depends on: weights, calibration data, candidates."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for images, labels in batches:
        h.update(images.numpy().tobytes())
        h.update(labels.numpy().tobytes())
    h.update(json.dumps({k: list(v) for k, v in candidates.items()}, sort_keys=True).encode())
    h.update(importance.encode())
    return h.hexdigest()[:24]


def _cached(path: Path, compute: Callable[[], dict]) -> tuple[dict[str, dict[int, float]], bool]:
    """A table read from `path`, or computed and written there; returns (table, was_cached)."""
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
            return {g: {int(k): float(v) for k, v in t.items()} for g, t in raw.items()}, True
        except (ValueError, AttributeError):
            pass  # a damaged cache entry is recomputed and overwritten
    table = compute()
    write_json(path, table)
    return table, False


def cached_sensitivity(
    cache_dir: Path,
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    order: Mapping[str, list[int]],
    candidates: Mapping[str, Sequence[int]],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    importance: str = "l1",
) -> tuple[dict[str, dict[int, float]], bool]:
    """measure_sensitivity, read from / written to `cache_dir`; returns (table, was_cached)."""
    key = cache_key(model, batches, candidates, importance)
    return _cached(
        Path(cache_dir) / f"sensitivity-{key}.json",
        lambda: measure_sensitivity(model, groups, order, candidates, batches),
    )


def cached_in_context(
    cache_dir: Path,
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    order: Mapping[str, list[int]],
    candidates: Mapping[str, Sequence[int]],
    context: Mapping[str, int],
    adapt: Sequence[tuple[torch.Tensor, torch.Tensor]],
    held_out: Sequence[tuple[torch.Tensor, torch.Tensor]],
    importance: str = "l1",
) -> tuple[dict[str, dict[int, float]], bool]:
    """measure_in_context, read from / written to `cache_dir`; returns (table, was_cached)."""
    around = json.dumps(dict(context), sort_keys=True)
    key = cache_key(model, [*adapt, *held_out], candidates, f"{importance} in context {around}")
    return _cached(
        Path(cache_dir) / f"sensitivity-context-{key}.json",
        lambda: measure_in_context(model, groups, order, candidates, context, adapt, held_out),
    )
