"""How far DeepLSP's calibrated weight cost moves between runs, with the networks that set
it timed once or three times (median).

The weight cost (`LatencyModel.weight_cost`, fitted by `calibrate` from the dense,
middle, smallest and two tilted networks) steers the whole allocation: in session 13 the
MobileNetV3-L runs that calibrated 0.074-0.075 table ms per million weights delivered
networks that fine-tuned to 58% where the others reached 65-68%. This bench repeats
`calibrate` on the same model, table and dense timing reference, alternating the two
ways, and reports each way's weight costs. prune_budget.py's cached checkpoints.

The json keeps every calibration network's point (table ms, weights, measured ms), so
other fitting rules can be judged on the same timings. `--held-out FILE` (a
knapsack_family json) times that file's networks after each calibration: networks of the
kind the search measures, to check each calibration's predictions against.

    .venv/bin/python bench/weight_cost_spread.py --model mobilenet_v3_large --repeats 4
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from prune_budget import HERE, SHAPE, cached_dense, paired_timing
from tabulate import tabulate

from deeplsp.atomic import write_json, write_text
from deeplsp.pruner import (
    WEIGHT_COST_NETWORKS,
    LatencyModel,
    PruneConfig,
    calibrate,
    calibration_networks,
    measure_model,
    scan,
)
from deeplsp.structure import prune_groups
from devices import fingerprint, get_device
from profiling.latency_table import Calibration, LatencyTable


def predicted_errors(calibration: dict, weight_cost: float) -> list[float]:
    """Relative errors on the held-out networks of the calibration curve through this
    calibration's networks, with `weight_cost` (table ms per weight element)."""
    pts = calibration["points"].values()
    cal = Calibration.fit(
        [t + weight_cost * w for t, w, _ in pts], [m for *_, m in pts], smooth=True
    )
    return [cal.predict(t + weight_cost * w) / m - 1 for t, w, m in calibration["held_out"]]


def held_out_row(calibration: dict) -> dict:
    """How one calibration predicts the held-out networks, and the weight cost (a grid
    over 0-0.15 table ms per million weights) that would have predicted them best."""

    def within(errs: list[float]) -> float:
        return round(sum(abs(e) <= 0.1 for e in errs) / len(errs), 2)

    own = predicted_errors(calibration, calibration["weight_cost"] / 1e6)
    best = min(
        (i / 1000 for i in range(151)),
        key=lambda w: sum(e * e for e in predicted_errors(calibration, w / 1e6)),
    )
    return {
        "weight_cost": round(calibration["weight_cost"], 3),
        "within_10pct": within(own),
        "median_abs_error": round(statistics.median(abs(e) for e in own), 3),
        "median_bias": round(statistics.median(own), 3),
        "best_weight_cost": best,
        "within_10pct_at_best": within(predicted_errors(calibration, best / 1e6)),
        "at_zero": within(predicted_errors(calibration, 0.0)),
    }


def markdown(result: dict) -> str:
    args = result["args"]
    text = (
        f"# The calibrated weight cost over {args['repeats']} calibrations per way, "
        f"{args['model']} (`cpu`, {args['threads']} thread(s))\n\nTable ms per million "
        f"weights; the networks that set it ({', '.join(WEIGHT_COST_NETWORKS)}) timed once "
        "or three times (median), the ways alternating; one dense timing reference for "
        "all.\n\n" + tabulate(result["rows"], headers="keys", tablefmt="github") + "\n"
    )
    held = [held_out_row(c) for c in result.get("calibrations", []) if c["held_out"]]
    if held:
        n = len(result["calibrations"][0]["held_out"])
        text += (
            f"\n## The {n} held-out networks ({args['held_out']}), timed after each "
            "calibration\n\nShare predicted within +-10% by the calibration's curve and "
            "weight cost; the weight cost that predicts them best (least squares) and the "
            "share under it; the share with no weight cost.\n\n"
            + tabulate(held, headers="keys", tablefmt="github")
            + "\n"
        )
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v3_large")
    p.add_argument("--repeats", type=int, default=4, help="calibrations per way")
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--ways", default="once,three times", help="once and/or three times")
    p.add_argument("--held-out", default=None, help="a knapsack_family json: networks to time")
    p.add_argument("--results", default=None, help="file stem (default weight_cost_spread-MODEL)")
    p.add_argument("--render", default=None, help="rewrite the md of this stored json only")
    args = p.parse_args()
    if args.render:
        path = Path(args.render)
        write_text(path.with_suffix(".md"), markdown(json.loads(path.read_text())))
        return

    name = args.model
    dense = cached_dense(name, args.train_subset)
    device = replace(get_device("cpu"), threads=args.threads)
    cfg = PruneConfig(model=name, dataset="fashionmnist", out="-", budget_ratio=0.3)
    sc = scan(cfg, dense, SHAPE, device.channel_multiple, HERE / "cache")

    def prune(keeps: dict[str, int]):
        return prune_groups(copy.deepcopy(dense), SHAPE, keeps, order=sc.order)

    costs: dict[str, list[float]] = {way: [] for way in args.ways.split(",")}
    held_out = []
    if args.held_out:
        held_out = [r["keeps"] for r in json.loads(Path(args.held_out).read_text())["rows"]]
    calibrations = []
    with (
        LatencyTable(device, HERE / "cache" / "latency.sqlite") as table,
        tempfile.TemporaryDirectory() as tmp,
    ):
        timing, dense_ms = paired_timing(device, dense, Path(tmp) / "dense.onnx", args.iters)
        for i in range(args.repeats):
            for way in costs:
                lat = LatencyModel(dense, SHAPE, sc.groups, table)
                retime = WEIGHT_COST_NETWORKS if way == "three times" else ()
                _, measured = calibrate(
                    lat, dense, SHAPE, timing, sc.candidates, dense_ms, sc.order, retime=retime
                )
                costs[way].append(1e6 * lat.weight_cost)
                nets = calibration_networks(lat, sc.candidates)
                held = [
                    (keeps, measure_model(prune(keeps), SHAPE, timing)["latency"]["median"])
                    for keeps in held_out
                ]
                calibrations.append(
                    {
                        "way": way,
                        "weight_cost": costs[way][-1],
                        # name -> [table ms, weight elements, measured ms]
                        "points": {n: [*lat.parts(k), measured[n]] for n, k in nets.items()},
                        "held_out": [[*lat.parts(k), ms] for k, ms in held],
                    }
                )
                print(f"repeat {i + 1}, timed {way}: {costs[way][-1]:.3f}", flush=True)
    rows = [
        {
            "timed": way,
            "weight_costs": " / ".join(f"{c:.3f}" for c in got),
            "median": round(statistics.median(got), 3),
            "min": round(min(got), 3),
            "max": round(max(got), 3),
        }
        for way, got in costs.items()
    ]
    stem = HERE / "results" / (args.results or f"weight_cost_spread-{name}")
    result = {
        "fingerprint": fingerprint(device),
        "args": vars(args),
        "dense_ms": dense_ms,
        "rows": rows,
        "calibrations": calibrations,
    }
    write_json(stem.with_suffix(".json"), result)
    write_text(stem.with_suffix(".md"), markdown(result))


if __name__ == "__main__":
    main()
