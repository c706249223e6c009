"""Allocation rules compared at equal *measured* latency, fine-tuned over several seeds.

prune_budget.py runs each method once per budget, so a cell compares networks that
landed at different points of the budget band and were fine-tuned once. At deep cuts of
MobileNetV3-L both matter more than the rule: top-1 climbs steeply with latency there,
and one fine-tuning seed moves it by several points. This bench removes both:

- each rule's family of networks is swept over its knob (DeepLSP's rules: the table
  budget, 0.90 -> 0.22 of the dense network's table sum in steps of 0.04; global
  Taylor: its keep ratio, 0.95 -> 0.05 in steps of 0.05), every network timed
  alternately with the dense model (`deeplsp.pruner.Timing`, paired; three timings,
  median, where it is near a target);
- per target (a fraction of the dense latency), the rule's largest-latency network
  measured at or under it is fine-tuned with `--seeds` seeds (`deeplsp.pruner.finetune`,
  DeepLSP's routine) and evaluated.

Rules: `knapsack` (DeepLSP's default, `allocate_coupled` on the measured loss increase),
`threshold` (one global Taylor threshold, counts rounded up to DeepLSP's 8 ratio
candidates: `--allocation threshold` as session 7 built it), `threshold, every multiple`
(the same rule with every multiple of the device's channel multiple as a candidate:
`--allocation threshold` since session 8), and `global Taylor` (torch-pruning's
MetaPruner, as in prune_budget.py). Same dense checkpoint, calibration data and Taylor
channel order as prune_budget.py; channel counts in multiples of the device's channel
multiple (16 on an AVX-512 host, 8 otherwise).

    .venv/bin/python bench/allocation_sweep.py [--targets 0.3,0.5] [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import replace

import numpy as np
from prune_budget import (
    HERE,
    SHAPE,
    dense_checkpoint,
    evaluation_loader,
    finetune_and_eval,
    global_taylor,
    paired_timing,
    timed_near,
)
from tabulate import tabulate

from deeplsp.atomic import write_json, write_text
from deeplsp.datasets import load_split, make_loader
from deeplsp.pruner import (
    LatencyModel,
    PruneConfig,
    allocate_coupled,
    allocate_threshold,
    every_multiple,
    scan,
)
from deeplsp.structure import prune_groups
from deeplsp.training import evaluate
from devices import fingerprint, get_device
from profiling.counting import count_torch
from profiling.latency_table import LatencyTable


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v3_large")
    p.add_argument("--targets", default="0.3,0.5", help="fractions of the dense latency")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--test-subset", type=int, default=1000)
    p.add_argument("--dense-epochs", type=int, default=3)
    p.add_argument("--results", default="allocation_sweep")
    args = p.parse_args()
    targets = [float(t) for t in args.targets.split(",")]

    device = get_device("cpu")
    name = args.model
    _, dense = dense_checkpoint(name, args)
    loader = evaluation_loader(args.test_subset)
    calib_ds = load_split("fashionmnist", "train", train_augment=False, subset=128, seed=0)
    mp_batches = list(make_loader(calib_ds, 32, shuffle=False))  # prune_budget's, for MetaPruner
    work = HERE / "cache" / "allocation_sweep"
    work.mkdir(parents=True, exist_ok=True)
    timing, dense_ms = paired_timing(device, dense, work / "dense.onnx", 50)

    # DeepLSP's own inputs, as `deeplsp.pruner.prune` builds them (default config)
    cfg = PruneConfig(
        model=name,
        dataset="fashionmnist",
        out=str(work / "run"),
        budget_ratio=targets[0],
        finetune_epochs=1,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
    )
    multiple = device.channel_multiple
    sc = scan(cfg, dense, SHAPE, multiple, HERE / "cache")  # DeepLSP's steps 2-3
    groups, coarse, scores, order, sens = sc.groups, sc.candidates, sc.scores, sc.order, sc.sens
    every = every_multiple(groups, multiple)
    table = LatencyTable(device, HERE / "cache" / "latency.sqlite", warmup=10, iters=25)
    lat = LatencyModel(dense, SHAPE, groups, table)
    full_sum = lat.table_sum({g.id: g.channels for g in groups})

    def pruned(keeps):
        if keeps is None:
            return None  # the rule has no network at this knob
        return prune_groups(copy.deepcopy(dense), SHAPE, keeps, order=order)

    def fits(t):
        return lambda k: lat.table_sum(k) <= t

    rules = {
        "knapsack": lambda t: pruned(allocate_coupled(lat, coarse, sens, t)[0]),
        "threshold": lambda t: pruned(allocate_threshold(coarse, scores, fits(t))),
        "threshold, every multiple": lambda t: pruned(allocate_threshold(every, scores, fits(t))),
        "global Taylor": lambda r: global_taylor(dense, r, mp_batches, multiple),
    }
    sweep_rows, rows = [], []

    fp = fingerprint(device)
    dense_top1 = evaluate(dense, loader, "cpu")["top1"]
    for rule, make in rules.items():
        if rule == "global Taylor":
            knobs = [round(1 - 0.05 * i, 2) for i in range(1, 20)]
        else:
            knobs = [round(0.9 - 0.04 * i, 2) for i in range(18)]
        family = []
        for knob in knobs:
            try:
                net = make(knob if rule == "global Taylor" else knob * full_sum)
            except Exception as exc:  # InfeasibleBudget and the like: the family ends here
                print(f"{rule} at {knob}: {exc}", flush=True)
                continue
            if net is None:
                continue
            ratio = timed_near(net, timing, max(targets) * dense_ms) / dense_ms
            macs = count_torch(net, SHAPE).macs
            family.append((knob, ratio, macs, net))
            sweep_rows.append(
                {"rule": rule, "knob": knob, "of_dense": round(ratio, 3), "macs_M": macs / 1e6}
            )
            print(sweep_rows[-1], flush=True)
        for target in targets:
            under = [f for f in family if f[1] <= target]
            if not under:
                continue
            knob, ratio, macs, net = max(under, key=lambda f: f[1])
            tops = [
                100 * finetune_and_eval(copy.deepcopy(net), dense, replace(cfg, seed=s), loader)
                for s in range(args.seeds)
            ]
            rows.append(
                {
                    "target": target,
                    "rule": rule,
                    "knob": knob,
                    "of_dense": round(ratio, 3),
                    "macs_M": round(macs / 1e6, 1),
                    "top1_per_seed": " / ".join(f"{t:.1f}" for t in tops),
                    "top1_mean": round(float(np.mean(tops)), 1),
                }
            )
            print(rows[-1], flush=True)
        rows.sort(key=lambda r: (r["target"], r["rule"]))
        write_json(
            HERE / "results" / f"{args.results}.json",
            {"fingerprint": fp, "args": vars(args), "rows": rows, "sweep": sweep_rows},
        )
        write_text(
            HERE / "results" / f"{args.results}.md",
            f"# Allocation rules at equal measured latency: {name}, `cpu` ({fp['cpu']}, "
            f"{fp['cores']} threads, channel multiple {multiple})\n\n"
            f"Dense: {dense_ms:.3f} ms, top-1 {dense_top1:.1%} ({args.dense_epochs} epochs "
            f"on {args.train_subset} images). Per target, each rule's largest-latency "
            f"network at or under it, fine-tuned 1 epoch with {args.seeds} seeds; top-1 on "
            f"{args.test_subset} test images.\n\n"
            + tabulate(rows, headers="keys", tablefmt="github")
            + "\n\n## Every network swept (knob: table budget / dense table sum, or global "
            "Taylor's keep ratio)\n\n"
            + tabulate(sweep_rows, headers="keys", tablefmt="github")
            + "\n",
        )


if __name__ == "__main__":
    main()
