"""Does adaptive-BN find a better network than the threshold rule's among its perturbations?

At one table budget (`--budget`, a fraction of the dense model's table sum; DeepLSP's
candidates, sensitivity, importance scores and latency table from bench/cache/), the
threshold rule's answer (`pruner.allocate_threshold`: one global threshold on importance
divided by the group's mean, over every channel multiple, filled to the budget) is the
reference. `--samples` perturbed answers (`perturbed_thresholds`): the same rule with
each group's importance scaled by a factor drawn log-uniformly from [1/`--spread`,
`--spread`], so each still fills the table budget (EagleEye's random strategies, drawn
around global pruning's answer instead of uniformly). Each answer is read by its
adaptive-BN loss on two image draws: draw A picks, draw B checks the pick is not the
draw's noise (the least of many noisy readings is biased low). The reference, the
`--finetune` answers lowest on draw A and the one highest get prune_budget's fine-tuning
over `--seeds` seeds.
Writes bench/results/abn_search-MODEL.{json,md} (or `--results`).

    .venv/bin/python bench/abn_search.py --model resnet18 --dense-epochs 5 --budget 0.3
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
from collections.abc import Callable

from prune_budget import (
    HERE,
    SHAPE,
    cached_scan,
    evaluation_loader,
    finetune_over_seeds,
    scan_arguments,
    write_results,
)

from deeplsp.adaptive_bn import adapted_loss
from deeplsp.pruner import (
    LatencyModel,
    abn_batches,
    allocate_threshold,
    every_multiple,
)
from deeplsp.structure import prune_groups
from profiling.counting import count_torch
from profiling.latency_table import LatencyTable


def perturbed_thresholds(
    candidates: dict[str, list[int]],
    scores: dict,
    fits: Callable[[dict[str, int]], bool],
    n: int,
    spread: float,
) -> list[tuple[str, dict[str, int]]]:
    """The threshold rule's answer ("threshold"), then `n` answers of the same rule with
    each group's importance scaled by a factor drawn log-uniformly from [1/`spread`,
    `spread`] ("threshold 1", ...; one fixed draw), each still filling the budget."""
    out = [("threshold", allocate_threshold(candidates, scores, fits))]
    rng = random.Random(0)
    for i in range(1, n + 1):
        factor = {g: spread ** rng.uniform(-1.0, 1.0) for g in candidates}
        scaled = {g: v * factor[g] for g, v in scores.items()}
        out.append((f"threshold {i}", allocate_threshold(candidates, scaled, fits)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--budget", type=float, default=0.3, help="table budget (x dense sum)")
    p.add_argument("--samples", type=int, default=24, help="perturbed answers")
    p.add_argument("--spread", type=float, default=1.15, help="largest importance factor")
    p.add_argument("--finetune", type=int, default=2, help="lowest-on-draw-A answers to fine-tune")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds (top-1: their mean)")
    scan_arguments(p)
    p.add_argument("--results", default=None, help="file stem (default abn_search-MODEL)")
    args = p.parse_args()

    name = args.model
    dense, device, cfg, sc = cached_scan(
        name, args.train_subset, args.test_subset, args.dense_epochs, args.threads
    )
    draws = {"A": abn_batches(cfg), "B": abn_batches(cfg, draw=3)}
    test_loader = evaluation_loader(args.test_subset)
    every = every_multiple(sc.groups, device.channel_multiple)
    rows, seen = [], set()
    with LatencyTable(device, HERE / "cache" / "latency.sqlite") as table:
        lat = LatencyModel(dense, SHAPE, sc.groups, table)
        dense_sum = lat.table_sum({g.id: g.channels for g in sc.groups})
        budget = args.budget * dense_sum
        answers = perturbed_thresholds(
            every, sc.scores, lambda k: lat.table_sum(k) <= budget, args.samples, args.spread
        )
        for answer, keeps in answers:
            key = tuple(sorted(keeps.items()))
            if key in seen:
                continue
            seen.add(key)
            net = prune_groups(copy.deepcopy(dense), SHAPE, keeps, order=sc.order)
            rows.append(
                {
                    "answer": answer,
                    "table_sum": round(lat.table_sum(keeps) / dense_sum, 3),
                    "macs_M": round(count_torch(net, SHAPE).macs / 1e6, 1),
                    **{f"abn_{d}": round(adapted_loss(net, *b), 3) for d, b in draws.items()},
                    "keeps": keeps,
                    "_net": net,
                }
            )
            print({k: v for k, v in rows[-1].items() if k != "_net"}, flush=True)
    by_a = sorted(rows[1:], key=lambda r: r["abn_A"])
    chosen = [rows[0], *by_a[: args.finetune], *by_a[-1:]] if args.seeds else []
    for row in chosen:
        top1 = finetune_over_seeds(row["_net"], dense, cfg, test_loader, args.seeds)
        row["top1"] = round(statistics.mean(top1), 3)
        row["top1_seeds"] = " / ".join(f"{t:.1%}" for t in top1)
        print(row["answer"], row["top1"], row["top1_seeds"], flush=True)
    for row in rows:
        del row["_net"]
    stem = HERE / "results" / (args.results or f"abn_search-{name}")
    write_results(
        stem,
        device,
        args,
        rows,
        f"# Adaptive-BN search around the threshold rule's answer, {name}\n\n"
        f"Table budget {args.budget} of the dense table sum; {args.samples} perturbed "
        f"answers (each group's importance scaled by a factor in [1/{args.spread}, "
        f"{args.spread}]); adaptive-BN losses in nats on two draws of "
        f"{sum(len(y) for _, y in draws['A'][1])} held-out training images (chance 2.30); "
        f"top-1 after {cfg.finetune_epochs} epoch(s) on {args.train_subset} images, the "
        f"mean over {args.seeds} seed(s), on {args.test_subset} test images, for the "
        f"reference, the {args.finetune} lowest on draw A and the highest.\n\n",
    )


if __name__ == "__main__":
    main()
