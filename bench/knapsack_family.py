"""What predicts a knapsack answer's fine-tuned top-1 before fine-tuning, at deep cuts?

Along the loss-increase knapsack's family (its answers at table budgets from `--lo` to
`--hi` of the dense model's table sum; DeepLSP's candidates, sensitivity and latency
table from bench/cache/), each distinct answer is pruned and read four ways before the
full fine-tuning: its summed loss increase (the knapsack's objective), its adaptive-BN
loss (`deeplsp.adaptive_bn`, the default selection's veto), and its adaptive-BN loss
after a short fine-tuning (one pass over `--short-images` training images, another draw
than the fine-tuning's, as NetAdapt's short-term fine-tuning); then it gets prune_budget's
fine-tuning and evaluation, once per `--seeds` seed (0: none). `--measure` also times each
answer on the `cpu` device as the pipeline does (paired with the dense model; since session
17 by side of the cache knee, `deeplsp.pruner.Timing`), so families can be compared at equal
measured latency. `--weight-costs` gives one family per
weight cost (LatencyModel.weight_cost, which each DeepLSP run calibrates for itself): at
equal size, do networks from different runs' families fine-tune alike? `--context R`: the
knapsack on the loss measured in context (`deeplsp.sensitivity.measure_in_context`, the
pipeline's `--sensitivity context`) around the uniform network at ratio R. Same dense
checkpoints and protocol as prune_budget.py (run that first: it trains and caches them).
Writes bench/results/knapsack_family-MODEL.{json,md} (or `--results`).

    .venv/bin/python bench/knapsack_family.py --model mobilenet_v3_large --lo 0.33 --hi 0.55
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import tempfile
from pathlib import Path

from prune_budget import (
    HERE,
    SHAPE,
    cached_scan,
    evaluation_loader,
    finetune_over_seeds,
    paired_timing,
    scan_arguments,
    write_results,
)

from deeplsp.adaptive_bn import adapted_loss
from deeplsp.datasets import load_split
from deeplsp.pruner import (
    LatencyModel,
    abn_batches,
    allocate_coupled,
    allocate_floored,
    allocate_threshold,
    context_table,
    cost_tables,
    distil,
    every_multiple,
    measure_model,
    summed_loss,
    uniform_keeps,
)
from deeplsp.structure import prune_groups
from profiling.counting import count_torch
from profiling.latency_table import LatencyTable


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v3_large")
    p.add_argument("--lo", type=float, default=0.33, help="smallest table budget (x dense sum)")
    p.add_argument("--hi", type=float, default=0.55, help="largest table budget (x dense sum)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--short-images", type=int, default=512)
    scan_arguments(p)
    p.add_argument(
        "--weight-costs",
        default="0",
        help="table ms per million weights (LatencyModel.weight_cost), one family each: each "
        "DeepLSP run calibrates its own (0.04-0.07 for MobileNetV3-L at one thread), so runs "
        "search different families",
    )
    p.add_argument(
        "--seeds", type=int, default=1, help="fine-tuning seeds (top-1: their mean; 0: none)"
    )
    p.add_argument(
        "--blends",
        default="1",
        help="knapsack cost tables (pruner.cost_tables; 1: the loss increase alone), one "
        "family each: the candidates adaptive-BN's veto chooses between",
    )
    p.add_argument(
        "--context",
        type=float,
        default=None,
        help="knapsack on the sensitivity measured in context (sensitivity.measure_in_context) "
        "with every other group at this uniform keep ratio, instead of the dense model's",
    )
    p.add_argument(
        "--threshold",
        action="store_true",
        help="also the threshold rule's answer (--allocation threshold) at each table budget, "
        "as blend 'threshold'",
    )
    p.add_argument(
        "--floors",
        default="",
        help="also each blend's knapsack with every group held to at least this fraction of "
        "the threshold rule's count at the same table budget (pruner.allocate_floored, the "
        "pipeline's at 0.75 for blend 1), one family per value (blend '1 >=0.5t')",
    )
    p.add_argument("--measure", action="store_true", help="time each answer on the device")
    p.add_argument("--iters", type=int, default=50, help="timed runs per round (--measure)")
    p.add_argument("--results", default=None, help="file stem (default knapsack_family-MODEL)")
    args = p.parse_args()

    name = args.model
    dense, device, cfg, sc = cached_scan(
        name, args.train_subset, args.test_subset, args.dense_epochs, args.threads
    )
    groups, candidates, order, sens = sc.groups, sc.candidates, sc.order, sc.sens
    adapt, held = abn_batches(cfg)
    if args.context is not None:
        around = uniform_keeps(sc.candidates, args.context)
        sens = context_table(cfg, dense, sc, around, HERE / "cache")[0]
    test_loader = evaluation_loader(args.test_subset)
    short_ds = load_split("fashionmnist", "train", subset=args.short_images, seed=7)
    rows, seen = [], set()
    with (
        LatencyTable(device, HERE / "cache" / "latency.sqlite") as table,
        tempfile.TemporaryDirectory() as tmp,
    ):
        timing = None
        if args.measure:
            timing, dense_ms = paired_timing(
                device, dense, Path(tmp) / "dense.onnx", args.iters, by_side=True
            )
        tables = cost_tables(sens, sc.scores, candidates, tuple(map(float, args.blends.split(","))))
        families = [(b, None, costs) for b, costs in tables.items()]
        for floor in (float(f) for f in args.floors.split(",") if f):
            families += [(f"{b:g} >={floor:g}t", floor, c) for b, c in tables.items()]
        if args.threshold:
            families.append(("threshold", None, None))
        every = every_multiple(groups, device.channel_multiple)
        for weight_cost, (blend, floor, costs) in itertools.product(
            map(float, args.weight_costs.split(",")), families
        ):
            lat = LatencyModel(dense, SHAPE, groups, table, weight_cost=weight_cost / 1e6)
            dense_sum = lat.table_sum({g.id: g.channels for g in groups})
            for i in range(args.steps):
                frac = args.lo + (args.hi - args.lo) * i / max(args.steps - 1, 1)

                def fits(k: dict, b: float = frac * dense_sum, lat=lat) -> bool:
                    return lat.table_sum(k) <= b

                if costs is None:
                    keeps = allocate_threshold(every, sc.scores, fits)
                elif floor is None:
                    keeps, _ = allocate_coupled(lat, candidates, costs, frac * dense_sum)
                else:
                    rule = allocate_threshold(every, sc.scores, fits)
                    keeps = allocate_floored(lat, candidates, costs, rule, frac * dense_sum, floor)
                key = tuple(sorted(keeps.items()))
                if key in seen:
                    continue
                seen.add(key)
                net = prune_groups(copy.deepcopy(dense), SHAPE, keeps, order=order)
                ms = timing and measure_model(net, SHAPE, timing)["latency"]["median"]
                short = copy.deepcopy(net)
                distil(short, dense, {}, short_ds, 1, cfg, "short fine-tune")
                top1 = finetune_over_seeds(net, dense, cfg, test_loader, args.seeds)
                fine_tuned = top1 and {
                    "top1": round(statistics.mean(top1), 3),
                    "top1_seeds": " / ".join(f"{t:.1%}" for t in top1),
                }
                rows.append(
                    {
                        "weight_cost": weight_cost,
                        "blend": blend,
                        "table_budget": round(frac, 3),
                        "table_sum": round(lat.table_sum(keeps) / dense_sum, 3),
                        **(
                            {"measured_ms": round(ms, 4), "of_dense": round(ms / dense_ms, 3)}
                            if timing
                            else {}
                        ),
                        "macs_M": round(count_torch(net, SHAPE).macs / 1e6, 1),
                        "weights_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
                        "groups_at_quarter_or_less": sum(
                            keeps[g.id] <= g.channels // 4 for g in groups
                        ),
                        # (the threshold rule's counts are mostly not scanned)
                        "summed_loss": "-" if costs is None else round(summed_loss(sens, keeps), 2),
                        "adaptive_bn_loss": round(adapted_loss(net, adapt, held), 3),
                        "after_short_finetune": round(adapted_loss(short, adapt, held), 3),
                        **(fine_tuned or {}),
                        "keeps": keeps,  # the json's only
                    }
                )
                print(rows[-1], flush=True)
    stem = HERE / "results" / (args.results or f"knapsack_family-{name}")
    write_results(
        stem,
        device,
        args,
        rows,
        f"# The loss-increase knapsack's family, {name}: what predicts fine-tuned top-1\n\n"
        f"Answers at table budgets {args.lo}-{args.hi} of the dense table sum; losses in "
        f"nats on {sum(len(y) for _, y in held)} held-out training images (chance 2.30); "
        f"short fine-tuning: one pass over {args.short_images} images; top-1 after "
        f"{cfg.finetune_epochs} epoch(s) on {args.train_subset} images, the mean over "
        f"{args.seeds} seed(s), on {args.test_subset} test images; `weight_cost`: table ms per "
        f"million weights added to the table sum (one family per value). The knapsack's "
        f"loss table: "
        + (
            f"in context, every other group at {args.context:g} of its channels "
            "(`measure_in_context`; `summed_loss` is its sum)"
            if args.context is not None
            else "each group cut alone in the dense model"
        )
        + ".\n\n",
    )


if __name__ == "__main__":
    main()
