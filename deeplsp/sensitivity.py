"""How much each channel group can lose, measured on real data.

For every group and candidate keep count, the calibration loss is measured
with the group's least important channels (the ones `prune_groups` would
remove) silenced: their outputs are zeroed after the last layer that produces
them (BatchNorm, or the conv/linear itself), which is exactly what removing
them does to every layer downstream. No model copy and no re-tracing per
candidate, so a full scan costs one forward pass of the calibration batches per
(group, candidate).

Results are cached on disk, keyed by the weights, the calibration data and the
candidates, so a second run does not recompute them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

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
    modules = dict(model.named_modules())
    handles: dict[str, list] = {}

    def cut(g: ChannelGroup, keep: int) -> None:
        for h in handles.pop(g.id, []):
            h.remove()
        if keep < g.channels:
            drop = torch.tensor(order[g.id][: g.channels - keep], dtype=torch.long)
            handles[g.id] = [_silence(m, drop) for m in _producers(g, modules)]

    result: dict[str, dict[int, float]] = {g.id: {g.channels: 0.0} for g in groups}
    try:
        base = _loss(model, batches)
        work = [(g, k) for g in groups for k in candidates[g.id] if k != g.channels]
        for g, k in progress(work, "sensitivity"):
            cut(g, k)
            result[g.id][k] = max(0.0, _loss(model, batches) - base)
            cut(g, g.channels)
    finally:
        for g in groups:
            cut(g, g.channels)
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
    path = Path(cache_dir) / f"sensitivity-{key}.json"
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
            return {g: {int(k): float(v) for k, v in t.items()} for g, t in raw.items()}, True
        except (ValueError, AttributeError):
            pass  # a damaged cache entry is recomputed and overwritten
    table = measure_sensitivity(model, groups, order, candidates, batches)
    write_json(path, table)
    return table, False
