"""How well DeepLSP predicts the measured latency of pruned networks, and what the
latency table costs to build.

For each model at the Fashion-MNIST shape (1x32x32; fresh weights: latency does
not depend on weight values), N random pruned variants (every group at a random
candidate keep count, 8 ratios) are predicted from the per-layer table with the
pipeline's calibration (dense, middle and smallest candidates) and then pruned
for real, exported and measured on the `cpu` device (median of the middle of
three timed windows, as the pipeline does). Reports the share within +-10%, and
the table's cold (empty cache) and warm build times.

Every variant is measured a second time, independently: the share of those
re-measurements within +-10% of the first is the ceiling that no predictor can
beat on this machine, and is reported next to the predictor's share.
Results: bench/results/latency_prediction.{json,md}.

    .venv/bin/python bench/latency_prediction.py [--models resnet18,mobilenet_v3_large] [--n 50]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from deeplsp.atomic import write_json, write_text
from deeplsp.models import build_model
from deeplsp.pruner import (
    RATIOS,
    REPEATS,
    LatencyModel,
    calibrate,
    candidate_keeps,
    measure_model,
)
from deeplsp.structure import find_groups, prune_groups
from devices import fingerprint, get_device
from profiling.isolated import measure_isolated
from profiling.latency_table import LatencyTable

RESULTS = Path(__file__).parent / "results"


def table_cost(model, shape, groups, candidates, device, rng) -> dict:
    """Seconds to fill an empty table for 10 random variants, then to read it again."""
    variants = [{g: rng.choice(c) for g, c in candidates.items()} for _ in range(10)]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            with LatencyTable(device, Path(tmp) / "latency.sqlite") as table:
                lat = LatencyModel(model, shape, groups, table)
                for keeps in variants:
                    lat.table_sum(keeps)
                rows = table.stats["rows"]
            out[f"{label}_s"] = round(time.perf_counter() - t0, 2)
        out["rows"] = rows
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenet_v3_large")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    device = get_device("cpu")
    shape = (1, 1, 32, 32)
    summary, variants = [], []
    with tempfile.TemporaryDirectory() as cache:
        for name in args.models.split(","):
            rng = random.Random(args.seed)
            model = build_model(name, num_classes=10, in_channels=1, input_size=32).eval()
            groups = find_groups(model, shape)
            candidates = candidate_keeps(groups, RATIOS, device.channel_multiple)
            cost = table_cost(model, shape, groups, candidates, device, rng)
            with LatencyTable(device, Path(cache) / "latency.sqlite") as table:
                lat = LatencyModel(model, shape, groups, table)
                dense_ms = measure_model(model, shape, device, 10, args.iters)["latency"]["median"]
                calib, small_ms = calibrate(
                    lat, model, shape, device, candidates, dense_ms, 10, args.iters
                )
                errors, noise = [], []
                for i in range(args.n):
                    keeps = {g: rng.choice(c) for g, c in candidates.items()}
                    predicted = calib.predict(lat.table_sum(keeps))
                    pruned = prune_groups(copy.deepcopy(model), shape, keeps)
                    onnx_path = Path(cache) / "variant.onnx"
                    measured = measure_model(pruned, shape, device, 10, args.iters, onnx_path)[
                        "latency"
                    ]["median"]
                    # the same file again, in another fresh process, a few seconds later
                    again = measure_isolated(
                        onnx_path, device.resolved_threads(), 10, args.iters, REPEATS
                    ).median
                    err = (predicted - measured) / measured
                    errors.append(err)
                    noise.append((again - measured) / measured)
                    variants.append(
                        {
                            "model": name,
                            "i": i,
                            "predicted_ms": predicted,
                            "measured_ms": measured,
                            "remeasured_ms": again,
                            "rel_error": err,
                        }
                    )
                    print(
                        f"{name} {i + 1}/{args.n}: predicted {predicted:.3f} ms, "
                        f"measured {measured:.3f} ms ({err:+.1%}), again {again:.3f} ms",
                        flush=True,
                    )
            abs_err = sorted(abs(e) for e in errors)
            summary.append(
                {
                    "model": name,
                    "variants": args.n,
                    "within_10pct": f"{sum(e <= 0.10 for e in abs_err) / len(abs_err):.0%}",
                    "remeasured_within_10pct": (
                        f"{sum(abs(n) <= 0.10 for n in noise) / len(noise):.0%}"
                    ),
                    "median_abs_error": f"{statistics.median(abs_err):.1%}",
                    "remeasure_median_abs_diff": f"{statistics.median(map(abs, noise)):.1%}",
                    "p90_abs_error": f"{abs_err[int(0.9 * (len(abs_err) - 1))]:.1%}",
                    "dense_ms": round(dense_ms, 3),
                    "smallest_ms": round(small_ms, 3),
                    "table_rows": cost["rows"],
                    "table_cold_s": cost["cold_s"],
                    "table_warm_s": cost["warm_s"],
                }
            )
    fp = fingerprint(device)
    write_json(
        RESULTS / "latency_prediction.json",
        {"fingerprint": fp, "summary": summary, "variants": variants},
    )
    table_md = tabulate(summary, headers="keys", tablefmt="github")
    write_text(
        RESULTS / "latency_prediction.md",
        f"# Latency prediction on `cpu` ({fp['cpu']}, {fp['cores']} threads, onnxruntime "
        f"{fp['runtime']['onnxruntime']})\n\n"
        f"{args.n} random pruned variants per model (8 candidate ratios per group), input "
        f"1x32x32, batch 1. Predicted: per-layer table sum, calibrated on the dense, middle "
        f"and smallest candidates. Measured: exported ONNX, middle of three windows of "
        f"{args.iters} runs, each file in a fresh process. Every variant measured twice, "
        f"independently: `remeasured_within_10pct` is the share of second measurements "
        f"within 10% of the first, the ceiling for any predictor on this machine. "
        f"Table cost: 10 random variants from an empty cache (cold) and again from the "
        f"filled one (warm).\n\n{table_md}\n",
    )
    print(table_md)


if __name__ == "__main__":
    main()
