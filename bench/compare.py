"""The eleven pruners on real Fashion-MNIST, measured the same way on `cpu` (issue 4).

Runs the batch comparison (deeplsp.compare, resumable: rerun to continue) for each
model with one dense model trained per model (AdamW, `--dense-epochs` on
`--train-subset` images), then every method with the same training budget
(`--epochs` on the same images, evaluated on `--test-subset` test images), and
checks every method's achieved sparsity / channel reduction against its target:
exact methods must land within 1 point, inexact ones report the gap.
Results: bench/results/compare.{json,md} and bench/results/compare-<model>-fashionmnist.png.

    .venv/bin/python bench/compare.py [--models resnet18,mobilenet_v3_large]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tabulate import tabulate

from deeplsp.atomic import write_json, write_text
from deeplsp.compare import CompareConfig, run_compare
from deeplsp.report import COLUMNS, cell_text

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def target_check(row: dict) -> str:
    gap = row["gap"]
    if row["target_metric"] == "latency_ms":
        return "met" if gap <= 0 else f"missed by {gap:.3f} ms"
    if row["exact"]:
        return "ok" if abs(gap) <= 0.01 else f"OFF by {gap:+.3f}"
    return f"inexact, gap {gap:+.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenet_v3_large")
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--test-subset", type=int, default=1000)
    p.add_argument("--dense-epochs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "cache" / "compare")
    args = p.parse_args()

    sections, everything = [], []
    for model in args.models.split(","):
        cfg = CompareConfig(
            model=model,
            datasets=["fashionmnist"],
            out=str(args.out / model),
            epochs=args.epochs,
            dense_epochs=args.dense_epochs,
            train_subset=args.train_subset,
            test_subset=args.test_subset,
        )
        summary = run_compare(cfg)
        plot = args.out / model / "plot-fashionmnist.png"
        if plot.exists():
            shutil.copyfile(plot, RESULTS / f"compare-{model}-fashionmnist.png")
        rows, failed = [], []
        for c in summary["cells"]:
            if c.get("error"):
                failed.append(f"- {c['method']} failed: {c['error']}")
                continue
            rows.append([cell_text(c, k) for k, _ in COLUMNS] + [target_check(c)])
        table = tabulate(
            rows, headers=[h for _, h in COLUMNS] + ["target check"], tablefmt="github"
        )
        fp = summary["fingerprint"]
        sections.append(
            f"## {model}\n\nDense: {summary['cells'][0]['top1_dense']:.3f} top-1. "
            f"Device `cpu`: {fp.get('cpu')}, onnxruntime {fp['runtime'].get('onnxruntime')}.\n\n"
            f"{table}\n\n" + "\n".join(failed) + f"\n\n![](compare-{model}-fashionmnist.png)\n"
        )
        everything.append(summary)
    write_json(
        RESULTS / "compare.json", {"args": vars(args) | {"out": str(args.out)}, "runs": everything}
    )
    write_text(
        RESULTS / "compare.md",
        "# DeepLSP and the ten baselines on Fashion-MNIST (`cpu`)\n\n"
        f"Real Fashion-MNIST (Debian's copy), 32x32. Dense model: AdamW, {args.dense_epochs} "
        f"epoch(s) on {args.train_subset} training images. Every method: {args.epochs} "
        f"epoch(s) of its own training on the same images (distillation from the dense model "
        f"where the method fine-tunes), top-1 on {args.test_subset} test images. Latency: "
        "ONNX Runtime, batch 1, median / p90 of the middle of three timed windows, each in a "
        "fresh process. Target check: exact methods within 1 point of their target; "
        "inexact ones report the gap. DeepLSP runs at its keep ratio 0.5 here (the seed's "
        "setting); its latency-budget mode is benchmarked in prune_budget.md.\n\n"
        + "\n".join(sections),
    )


if __name__ == "__main__":
    main()
