"""How many weights a device keeps in cache inside a network: the knee past which each
more weight costs time.

Timed alone, a layer reads its weights from cache run after run. Inside a network every
layer's weights are read once per inference, and once the network's weights outgrow the
cache they come from memory. On the `cpu` device here (1 ONNX Runtime thread, AMD EPYC,
a 32 MB L3 shared with other machines), a chain of 3x3 convolutions (256 channels at
4x4) ran at the same time per layer up to a knee and 0.16-0.19 ms slower per million
weights past it; the knee read 2.7M and 3.3M weights in two probes an hour apart.
ResNet-18's variants pointed to the same place: with the weight cost charged only past
the knee, its predictions put 100% of 50 fresh variants within +-10% of measured (84%
within +-5%), where charging every weight put 88% (62%) in session 15 (bench/README.md,
session 16).

The knee is a property of the device, not of a model, so it is measured once per device
(`free_weights`, cached with the layer table) on such a chain, and the cost per weight
past it is fitted per model in its calibration (`fit_weight_cost`): in chains of other
layers the cost past the knee differed (1x1 convolutions on a 1x1 map: 0.04 ms per
million weights), as it depends on how often a layer reuses each weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from profiling.latency_table import LatencyTable, LayerSig, layer_onnx

# The chain's layer: ResNet-18's layer 3 and 4 convolutions at 32 px work on 4x4 to 8x8
# maps; 590K weights per layer step the chain through the knee in fine steps.
PROBE = LayerSig("conv", 256, 256, kernel=3, padding=1, in_hw=4, act="relu")
# Up to 32 layers (18.9M weights, 75 MB) since session 23: an Intel host's knee at 11.5M
# weights lay at the end of the chain to 20 layers, which read it at 5-9M or not at all
# from probe to probe; to 32, four probes of four read 11.45-11.68M (bench/README.md,
# knee_probe).
LENGTHS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32)
VERSION = 2  # of the probe: part of its rows' names, so a changed probe is measured anew
# A knee counts only if the time per layer past it grows by at least this fraction of
# the time per layer before it, the hinge explains most of what a line leaves, and at
# least MIN_PAST lengths lie past it, the step holding without the longest one (`fit_knee`).
# Without these, one slow timing of the longest chain read as a knee in some probes of a
# host and not in others (session 22: knees at 5.0-9.3M weights, or none), and the
# pricing of weights flipped with it.
MIN_STEP = 0.10
MIN_GAIN = 0.5
MIN_PAST = 3


@dataclass(frozen=True)
class Knee:
    """A fitted hinge: `ms = intercept + per_layer * n + per_weight * max(0, weights - free)`.

    `free` is None when no knee shows within the chain (the device held every length,
    or none): every weight is then charged, as a straight line does."""

    free: int | None
    per_layer_ms: float
    per_weight_ms: float
    chain: tuple[tuple[int, int, float], ...]  # (layers, weights, measured ms) per length

    def to_dict(self) -> dict:
        return {
            "free_weights": self.free,
            "per_layer_ms": self.per_layer_ms,
            "per_million_weights_ms": self.per_weight_ms * 1e6,
            "chain": [list(c) for c in self.chain],
        }


def _hinge(n: np.ndarray, ms: np.ndarray, knee: float, per_layer_weights: float):
    """(coefficients, sum of squared residuals) of the hinge with its knee at `knee` layers."""
    past = np.maximum(0.0, n - knee) * per_layer_weights
    a = np.stack([np.ones_like(n), n, past], axis=1)
    c, *_ = np.linalg.lstsq(a, ms, rcond=None)
    return c, float(np.sum((a @ c - ms) ** 2))


def fit_knee(chain: Sequence[tuple[int, int, float]]) -> Knee:
    """The hinge through (layers, weights, ms) points of a chain of equal layers, the knee
    searched on a grid of a tenth of a layer from the second length to the one with
    `MIN_PAST` longer ones after it, its other terms by least squares. The step must
    hold without the longest length too: one slow timing at the end is not a knee."""
    chain = sorted(chain)
    if len(chain) < MIN_PAST + 2:
        raise ValueError(
            f"fitting a knee needs at least {MIN_PAST + 2} chain lengths (got {len(chain)})"
        )
    n = np.array([c[0] for c in chain], dtype=np.float64)
    w = np.array([c[1] for c in chain], dtype=np.float64)
    ms = np.array([c[2] for c in chain], dtype=np.float64)
    per_layer_weights = w[0] / n[0]
    line = np.stack([np.ones_like(n), n], axis=1)
    coef, *_ = np.linalg.lstsq(line, ms, rcond=None)
    line_sse = float(np.sum((line @ coef - ms) ** 2))
    best = None
    for knee in np.arange(n[1], n[-MIN_PAST - 1] + 1e-9, 0.1):
        c, sse = _hinge(n, ms, knee, per_layer_weights)
        if c[2] > 0 and (best is None or sse < best[0]):
            best = (sse, knee, c)
    points = tuple((int(a), int(b), float(c)) for a, b, c in chain)
    if best is not None:
        sse, knee, c = best
        held, _ = _hinge(n[:-1], ms[:-1], knee, per_layer_weights)
        steps = (c[2] * per_layer_weights, held[2] * per_layer_weights)
        if c[1] > 0 and min(steps) >= MIN_STEP * c[1] and sse <= (1 - MIN_GAIN) * line_sse:
            return Knee(int(round(knee * per_layer_weights)), float(c[1]), float(c[2]), points)
    return Knee(None, float(coef[1]), 0.0, points)


def free_weights(
    table: LatencyTable,
    rounds: int = 3,
    probe: LayerSig = PROBE,
    lengths: Sequence[int] = LENGTHS,
) -> Knee:
    """The device's knee, from chains of `probe` of every length in `lengths` timed as
    whole files (stored with the table's rows, so a second run on the device reuses them)."""
    files = {
        f"spill-{VERSION}/{probe.key()}/x{k}": partial(layer_onnx, probe, repeat=k) for k in lengths
    }
    timed = table.networks(files, rounds=rounds)
    chain = [(k, k * probe.weights, timed[n]) for k, n in zip(lengths, files, strict=True)]
    return fit_knee(chain)
