"""How well DeepLSP predicts the measured latency of pruned networks, and what the
latency table costs to build.

For each model at the Fashion-MNIST shape (1x32x32; fresh weights: latency does
not depend on weight values), N random pruned variants (every group at a random
candidate keep count, 8 ratios) are predicted from the per-layer table with the
pipeline's calibration (its eight measured networks: dense, middle, smallest, two
tilted ones that also fit the cost per weight element that the table does not see,
past the device's cache knee (profiling.weight_spill), three random ones) and then pruned
for real, exported and measured on the `cpu` device (median of the middle of
three timed windows, as the pipeline does). Reports the share within +-10%, and
the table's cold (empty cache) and warm build times.

Every variant is measured a second time, independently: the share of those
re-measurements within +-10% of the first is the ceiling that no predictor can
beat on this machine, and is reported next to the predictor's share.

A shared VM can change speed in a way that pairing with the dense model does not
cancel: in session 9's MobileNetV3-L run the first 28 variants measured 15-25%
slower, relative to the dense model, than the same files did a day later, the
last 22 within 5%. So after every variant the middle calibration network is timed
again: `middle_drift` is how far it moved from its calibration timing, and the
summary reports the predictor's share among the variants measured while it held
within 5% (`steady`) next to the share over all of them.

`--timing paired` (the pipeline's default) times every file after the dense model
alternately with it and counts the ratio times the dense model's median, as
`deeplsp prune` does; `--timing absolute` times each file on its own.
Results: bench/results/RESULTS.{json,md} (`--results`, default
latency_prediction-TIMING), rewritten after every variant; an interrupted run
resumes where it stopped (same seed, timing and machine; `--fresh` restarts).

    .venv/bin/python bench/latency_prediction.py [--models resnet18,mobilenet_v3_large] [--n 50]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from tabulate import tabulate

from deeplsp.atomic import write_json, write_text
from deeplsp.models import build_model
from deeplsp.pruner import (
    RATIOS,
    STEADY,
    TIMINGS,
    LatencyModel,
    Timing,
    calibrate,
    candidate_keeps,
    measure_model,
)
from deeplsp.structure import find_groups, prune_groups
from devices import fingerprint, get_device
from profiling.latency_table import LatencyTable
from profiling.weight_spill import free_weights

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


def _summary(name: str, rows: list[dict], meta: dict) -> dict:
    abs_err = sorted(abs(v["rel_error"]) for v in rows)
    noise = [abs(v["remeasured_ms"] - v["measured_ms"]) / v["measured_ms"] for v in rows]
    drift = [abs(v["middle_drift"]) for v in rows if "middle_drift" in v]  # older runs: none
    steady = [abs(v["rel_error"]) for v in rows if abs(v.get("middle_drift", 1.0)) <= STEADY]
    return {
        "model": name,
        "variants": len(rows),
        "within_10pct": f"{sum(e <= 0.10 for e in abs_err) / len(abs_err):.0%}",
        "remeasured_within_10pct": f"{sum(n <= 0.10 for n in noise) / len(noise):.0%}",
        "median_abs_error": f"{statistics.median(abs_err):.1%}",
        "remeasure_median_abs_diff": f"{statistics.median(noise):.1%}",
        "p90_abs_error": f"{abs_err[int(0.9 * (len(abs_err) - 1))]:.1%}",
        "middle_drift_median": f"{statistics.median(drift):.1%}" if drift else "-",
        "middle_drift_max": f"{max(drift):.1%}" if drift else "-",
        "steady": len(steady),
        "steady_within_10pct": f"{sum(e <= 0.10 for e in steady) / len(steady):.0%}"
        if steady
        else "-",
        "weight_cost_per_M": round(1e6 * rows[-1]["calibration"].get("weight_cost", 0.0), 4),
        "free_weights_M": _millions(rows[-1]["calibration"].get("free_weights")),
        "dense_ms": round(meta["dense_ms"], 3),
        "smallest_ms": round(meta["smallest_ms"], 3),
        "table_rows": meta["table"]["rows"],
        "table_cold_s": meta["table"]["cold_s"],
        "table_warm_s": meta["table"]["warm_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenet_v3_large")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing", choices=TIMINGS, default="paired")
    p.add_argument("--results", help="file stem under bench/results/")
    p.add_argument(
        "--threads", type=int, help="ONNX Runtime threads on the cpu device (default: every core)"
    )
    p.add_argument("--fresh", action="store_true", help="discard earlier variants (else resume)")
    args = p.parse_args()
    args.results = args.results or f"latency_prediction-{args.timing}"

    device = replace(get_device("cpu"), threads=args.threads)
    fp = fingerprint(device)
    shape = (1, 1, 32, 32)
    state_path = RESULTS / f"{args.results}.json"
    run_key = {"seed": args.seed, "iters": args.iters, "timing": args.timing}
    state = {"fingerprint": fp, **run_key, "models": {}}
    if state_path.exists() and not args.fresh:
        old = json.loads(state_path.read_text())
        same = old.get("fingerprint", {}).get("id") == fp["id"]
        if same and all(old.get(k) == v for k, v in run_key.items()):
            state = old  # resume: every variant measured so far is kept
    cache = Path(__file__).parent / "cache" / "latency_prediction.sqlite"
    for name in args.models.split(","):
        entry = state["models"].setdefault(name, {"variants": []})
        model = build_model(name, num_classes=10, in_channels=1, input_size=32).eval()
        groups = find_groups(model, shape)
        candidates = candidate_keeps(groups, RATIOS, device.channel_multiple)
        if "table" not in entry:
            rng_table = random.Random(args.seed + 1)
            entry["table"] = table_cost(model, shape, groups, candidates, device, rng_table)
        # Not the calibration's stream (calibration_networks, seed 0): drawn from it, session
        # 10's variant 0 was the calibration's first random network, a point on the curve.
        rng = random.Random(f"variants-{args.seed}")
        with LatencyTable(device, cache) as table, tempfile.TemporaryDirectory() as tmp:
            lat = LatencyModel(model, shape, groups, table)
            knee = free_weights(table)
            lat.use_knee(knee)
            entry.setdefault("free_weights", knee.to_dict())
            timing = Timing(device, 10, args.iters)
            dense_onnx = Path(tmp) / "dense.onnx"
            dense_ms = measure_model(model, shape, timing, dense_onnx)["latency"]["median"]
            if args.timing == "paired":
                timing = Timing(device, 10, args.iters, dense_onnx, dense_ms)
            # the drift sentinel: the middle calibration network, timed again after each variant
            middle = Path(tmp) / "middle.onnx"
            calib, calib_ms = calibrate(
                lat, model, shape, timing, candidates, dense_ms, middle_onnx=middle
            )
            entry.setdefault("dense_ms", dense_ms)
            entry.setdefault("smallest_ms", calib_ms["smallest"])
            for i in range(args.n):
                keeps = {g: rng.choice(c) for g, c in candidates.items()}
                if i < len(entry["variants"]):
                    continue  # measured in an earlier run (same seed: same variant)
                predicted = calib.predict(lat.table_sum(keeps))
                table_ms, weights = lat.parts(keeps)
                pruned = prune_groups(copy.deepcopy(model), shape, keeps)
                onnx_path = Path(tmp) / "variant.onnx"
                measured = measure_model(pruned, shape, timing, onnx_path)["latency"]["median"]
                # the same file again, in another fresh process, a few seconds later
                again = timing.time(onnx_path)["latency"]["median"]
                drift = timing.time(middle)["latency"]["median"] / calib_ms["middle"] - 1
                err = (predicted - measured) / measured
                entry["variants"].append(
                    {
                        "i": i,
                        "predicted_ms": predicted,
                        "measured_ms": measured,
                        "remeasured_ms": again,
                        "middle_drift": drift,
                        "rel_error": err,
                        "table_ms": table_ms,
                        "weights": weights,
                        "calibration": {
                            **calib.to_dict(),
                            "weight_cost": lat.weight_cost,
                            "free_weights": lat.free_weights,
                            "measured_ms": calib_ms,
                        },
                    }
                )
                write_results(state, args)  # kept as soon as measured
                print(
                    f"{name} {i + 1}/{args.n}: predicted {predicted:.3f} ms, "
                    f"measured {measured:.3f} ms ({err:+.1%}), again {again:.3f} ms, "
                    f"middle network {drift:+.1%} from its calibration timing",
                    flush=True,
                )
    write_results(state, args)


def _millions(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def write_results(state: dict, args) -> None:
    fp, iters = state["fingerprint"], args.iters
    summary = [
        _summary(name, e["variants"], e) for name, e in state["models"].items() if e["variants"]
    ]
    state["summary"] = summary
    write_json(RESULTS / f"{args.results}.json", state)
    table_md = tabulate(summary, headers="keys", tablefmt="github")
    how = (
        f"timed alternately with the dense model (5 windows of {iters} runs each), median "
        "ratio times the dense model's median"
        if args.timing == "paired"
        else f"middle of three windows of {iters} runs"
    )
    write_text(
        RESULTS / f"{args.results}.md",
        f"# Latency prediction on `cpu` ({fp['cpu']}, {fp['cores']} threads, onnxruntime "
        f"{fp['runtime']['onnxruntime']})\n\n"
        f"Random pruned variants (`variants` per model; every group at one of 8 candidate "
        f"ratios), input 1x32x32, batch 1. Predicted: per-layer table sum (layers timed in a "
        f"fresh process; since session 15 each with its activation, by ONNX Runtime's kernel "
        f"time) plus `weight_cost_per_M` table ms per million weights (since session 16 "
        f"only the weights past the device's first `free_weights_M` million, the knee of "
        f"profiling.weight_spill's chain; '-': every weight), calibrated "
        f"on the pipeline's measured networks (dense, middle, smallest, two tilted ones "
        f"that also fit the weight cost and, since session 10, three random ones; session 8 "
        f"and earlier: the first three; since session 11 a smooth curve, a quadratic in "
        f"log-log through the dense and smallest, not one drawn through every point). "
        f"Measured: "
        f"exported ONNX in a fresh process, {how}. Every "
        f"variant measured twice, independently: `remeasured_within_10pct` is the share of "
        f"second measurements within 10% of the first, the ceiling for any predictor on this "
        f"machine. `middle_drift`: how far the middle calibration network, timed again "
        f"after each variant, moved from its calibration timing (median, max); "
        f"`steady_within_10pct`: the predictor's share among the `steady` variants, those "
        f"measured while it held within {STEADY:.0%}. Table cost: 10 random variants from an "
        f"empty cache (cold) and again from "
        f"the filled one (warm).\n\n{table_md}\n",
    )
    print(table_md, flush=True)


if __name__ == "__main__":
    main()
