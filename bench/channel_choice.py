"""Which channels a group keeps, with how many it keeps held fixed.

For each model and global-Taylor ratio: torch-pruning's global Taylor pruning (the
prune_budget baseline) decides how many channels each group keeps; the same counts
are then pruned three ways, keeping the channels first-order Taylor importance ranks
highest (as global Taylor did), and the ones L1 / L2 weight magnitude ranks highest
(`deeplsp.structure.removal_order`). Each network gets the prune_budget fine-tuning
and evaluation, and its adaptive-BN loss before fine-tuning is recorded
(`deeplsp.adaptive_bn`). Same dense checkpoints and protocol as prune_budget.py.
Writes bench/results/channel_choice.{json,md}.

    .venv/bin/python bench/channel_choice.py [--models resnet18,mobilenet_v3_large]
"""

from __future__ import annotations

import argparse
import copy

from prune_budget import (
    DENSE_EPOCHS,
    HERE,
    SHAPE,
    dense_path,
    evaluation_loader,
    finetune_and_eval,
    global_taylor,
)
from tabulate import tabulate

from deeplsp.adaptive_bn import adapted_loss
from deeplsp.atomic import write_json, write_text
from deeplsp.checkpoint import load_checkpoint
from deeplsp.datasets import calibration_batches
from deeplsp.pruner import PruneConfig
from deeplsp.structure import count_channels, find_groups, prune_groups, removal_order
from profiling.counting import count_torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenet_v3_large")
    p.add_argument("--ratios", default="0.35", help="global Taylor keep ratios")
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--test-subset", type=int, default=1000)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--results", default="channel_choice")
    args = p.parse_args()

    test_loader = evaluation_loader(args.test_subset)
    calib = calibration_batches("fashionmnist", None, 4, 32, 0)  # DeepLSP's default draw
    ((x, y),) = calibration_batches("fashionmnist", None, 1, 512, 1)  # held apart from calib
    adapt = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    held = [(x[i : i + 64], y[i : i + 64]) for i in range(256, len(y), 64)]
    rows = []
    for name in args.models.split(","):
        ckpt = dense_path(name, args.train_subset, DENSE_EPOCHS[name])
        dense = load_checkpoint(ckpt).build_model().eval()
        groups = find_groups(dense, SHAPE)
        for ratio in map(float, args.ratios.split(",")):
            cfg = PruneConfig(  # only its fine-tuning settings are used
                model=name,
                dataset="fashionmnist",
                out=str(HERE / "cache" / "run"),
                keep_ratio=ratio,
                finetune_epochs=args.finetune_epochs,
                train_subset=args.train_subset,
            )
            reference = global_taylor(dense, ratio, calib, 8)
            counts = count_channels(reference, groups)
            for choice in ("taylor", "l1", "l2"):
                order = removal_order(dense, SHAPE, choice, calib)
                model = prune_groups(copy.deepcopy(dense), SHAPE, counts, order=order)
                abn = adapted_loss(model, adapt, held)
                top1 = finetune_and_eval(model, dense, cfg, test_loader)
                rows.append(
                    {
                        "model": name,
                        "taylor_ratio": ratio,
                        "channels_kept_by": choice,
                        "macs": count_torch(model, SHAPE).macs,
                        "adaptive_bn_loss": round(abn, 3),
                        "top1": f"{top1:.1%}",
                    }
                )
                print(rows[-1], flush=True)
    write_json(HERE / "results" / f"{args.results}.json", {"args": vars(args), "rows": rows})
    write_text(
        HERE / "results" / f"{args.results}.md",
        "# Which channels, with the per-group counts fixed by global Taylor pruning\n\n"
        f"Real Fashion-MNIST; prune_budget's dense checkpoints; {args.finetune_epochs} "
        f"fine-tuning epoch(s) on {args.train_subset} images with distillation; top-1 on "
        f"{args.test_subset} test images; adaptive-BN loss on 256 held-out training images "
        "after BatchNorm re-estimation on 256 others.\n\n"
        + tabulate(rows, headers="keys", tablefmt="github")
        + "\n",
    )


if __name__ == "__main__":
    main()
