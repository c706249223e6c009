"""What one group's channels cost inside a pruned network, measured, against what the
latency model predicts with and without its cost per weight element.

Takes the loss-increase knapsack's answer at `--table-budget` (x the dense table sum,
under `--weight-cost`), varies one group (`--group`, default MobileNetV3-L's classifier
hidden layer) over `--counts`, and times each network on the `cpu` device as the pipeline
does (paired with the dense model), `--repeats` times. Each row: the group's count, the
network's table sum and weights, its measured ms, and the measured and predicted
differences from the smallest count (predicted = table difference x the measured ms per
table ms of the smallest network, under each weight cost). Whether a weight-heavy group
is as expensive as a high calibrated weight cost makes it: session 13's MobileNetV3-L
networks that fine-tuned to 58% cut this layer to 160 of 1280 under 0.075 table ms per
million weights. prune_budget.py's cached checkpoints.

    .venv/bin/python bench/group_cost.py --model mobilenet_v3_large --group classifier.0
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from prune_budget import HERE, SHAPE, cached_dense, paired_timing
from tabulate import tabulate

from deeplsp.atomic import write_json, write_text
from deeplsp.pruner import (
    LatencyModel,
    PruneConfig,
    allocate_coupled,
    measure_model,
    scan,
)
from deeplsp.structure import prune_groups
from devices import fingerprint, get_device
from profiling.latency_table import LatencyTable


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v3_large")
    p.add_argument("--group", default="classifier.0")
    p.add_argument("--counts", default="160,480,800,1280")
    p.add_argument("--table-budget", type=float, default=0.38, help="x the dense table sum")
    p.add_argument("--weight-cost", type=float, default=0.075, help="table ms per million")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--results", default=None, help="file stem (default group_cost-MODEL)")
    args = p.parse_args()

    name = args.model
    dense = cached_dense(name, args.train_subset)
    device = replace(get_device("cpu"), threads=args.threads)
    cfg = PruneConfig(model=name, dataset="fashionmnist", out="-", budget_ratio=0.3)
    sc = scan(cfg, dense, SHAPE, device.channel_multiple, HERE / "cache")
    counts = [int(c) for c in args.counts.split(",")]
    if args.group not in sc.candidates:
        raise SystemExit(f"--group {args.group!r} is not a group of {name}")
    timed: dict[int, list[float]] = {c: [] for c in counts}
    with (
        LatencyTable(device, HERE / "cache" / "latency.sqlite") as table,
        tempfile.TemporaryDirectory() as tmp,
    ):
        lat = LatencyModel(dense, SHAPE, sc.groups, table, weight_cost=args.weight_cost / 1e6)
        dense_sum = lat.table_sum({g.id: g.channels for g in sc.groups})
        base, _ = allocate_coupled(lat, sc.candidates, sc.sens, args.table_budget * dense_sum)
        nets = {c: {**base, args.group: c} for c in counts}
        parts = {c: lat.parts(k) for c, k in nets.items()}
        timing, dense_ms = paired_timing(device, dense, Path(tmp) / "dense.onnx", args.iters)
        for r in range(args.repeats):
            for c, keeps in nets.items():
                model = prune_groups(copy.deepcopy(dense), SHAPE, keeps, order=sc.order)
                timed[c].append(measure_model(model, SHAPE, timing)["latency"]["median"])
                print(f"repeat {r + 1}, {args.group} at {c}: {timed[c][-1]:.4f} ms", flush=True)
    ms = {c: statistics.median(t) for c, t in timed.items()}
    low = counts[0]

    def predicted(c: int, weight_cost: float) -> float:
        """The difference from the smallest count, in ms, scaled at the smallest network."""
        (t0, w0), (t, w) = parts[low], parts[c]
        return ((t - t0) + weight_cost * (w - w0)) * ms[low] / (t0 + weight_cost * w0)

    rows = [
        {
            "count": c,
            "table_ms": round(parts[c][0], 4),
            "weights_M": round(parts[c][1] / 1e6, 3),
            "measured_ms": round(ms[c], 4),
            "timings": " / ".join(f"{t:.4f}" for t in timed[c]),
            "measured_diff": round(ms[c] - ms[low], 4),
            "predicted_diff": round(predicted(c, args.weight_cost / 1e6), 4),
            "predicted_diff_no_weight_cost": round(predicted(c, 0.0), 4),
        }
        for c in counts
    ]
    stem = HERE / "results" / (args.results or f"group_cost-{name}")
    write_json(
        stem.with_suffix(".json"),
        {
            "fingerprint": fingerprint(device),
            "args": vars(args),
            "dense_ms": dense_ms,
            "rows": rows,
        },
    )
    write_text(
        stem.with_suffix(".md"),
        f"# What {args.group} costs inside a pruned {name} (`cpu`, {args.threads} thread(s))\n\n"
        f"The loss-increase knapsack's answer at {args.table_budget} of the dense table sum "
        f"under {args.weight_cost} table ms per million weights, with {args.group} at each "
        f"count; measured ms: the median of {args.repeats} paired timings (dense "
        f"{dense_ms:.3f} ms); differences from the count {low}; predicted: the table "
        "difference, with and without the weight cost, scaled by the measured ms per table "
        f"ms of the count-{low} network.\n\n"
        + tabulate(rows, headers="keys", tablefmt="github")
        + "\n",
    )


if __name__ == "__main__":
    main()
