"""How the knapsack prices weights under the device's cache knee, on the bench's cached
sensitivity and latency table (no timing, no training): the loss knapsack's answers at a
few table budgets under a given weight cost and knee, with every weight charged (the
allocation until session 16) and with weights free first where that answer fits under
the knee (`deeplsp.pruner.allocate_coupled` since session 17). Reports per answer the
classifier's hidden width and the final convolution's (MobileNetV3-L's weight-heaviest
groups), the layer weights and the summed loss increase.

Session 17's MobileNetV3-L 30% run b calibrated 0.097 table ms per million weights past
a 3.3M knee; charged on every weight, that price cut the classifier's hidden layer to
160 of 1280 channels, and the network fine-tuned to 57%. Run prune_budget.py first (it
trains and caches the dense checkpoint, the sensitivity and the table).

    .venv/bin/python bench/knee_pricing.py [--weight-cost 0.097] [--knee 3304448]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prune_budget import HERE, SHAPE, cached_scan, write_results

from deeplsp.pruner import LatencyModel, _allocate_coupled, allocate_coupled
from profiling.latency_table import LatencyTable

RESULTS = Path(__file__).parent / "results"
WIDE = ("classifier.0", "features.16.0")  # MobileNetV3-L's weight-heaviest groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v3_large")
    p.add_argument("--weight-cost", type=float, default=0.097, help="table ms per M weights")
    p.add_argument("--knee", type=int, default=3_304_448, help="free layer weights")
    p.add_argument("--budgets", default="0.35,0.4,0.45,0.5", help="x the dense table sum")
    p.add_argument("--results", default=None, help="file stem (default knee_pricing-MODEL)")
    args = p.parse_args()

    dense, device, _, sc = cached_scan(args.model)  # the bench's table: one thread
    rows = []
    with LatencyTable(device, HERE / "cache" / "latency.sqlite") as table:
        lat = LatencyModel(dense, SHAPE, sc.groups, table)
        dense_table = lat.table_sum({g.id: g.channels for g in sc.groups})
        lat.weight_cost, lat.free_weights = args.weight_cost / 1e6, args.knee
        for frac in map(float, args.budgets.split(",")):
            budget = frac * dense_table
            answers = {
                "every weight charged": _allocate_coupled(
                    lat, lat, sc.candidates, sc.sens, budget, 10
                ),
                "free first": allocate_coupled(lat, sc.candidates, sc.sens, budget),
            }
            for rule, (keeps, loss) in answers.items():
                rows.append(
                    {
                        "table_budget": frac,
                        "rule": rule,
                        **{g: keeps.get(g, "-") for g in WIDE},
                        "layer_weights_M": round(lat.parts(keeps)[1] / 1e6, 2),
                        "summed_loss": round(loss, 2),
                        "true_table_sum": round(lat.table_sum(keeps) / dense_table, 3),
                    }
                )
                print(rows[-1], flush=True)
    stem = RESULTS / (args.results or f"knee_pricing-{args.model}")
    write_results(
        stem,
        device,
        args,
        rows,
        f"# How the knapsack prices weights under the cache knee, {args.model}\n\n"
        f"Weight cost {args.weight_cost} table ms per million weights past {args.knee:,} "
        "free layer weights; table budgets as a fraction of the dense table sum "
        "(`true_table_sum`: the answer's sum with only the weights past the knee charged, "
        "what the search holds it to).\n\n",
    )


if __name__ == "__main__":
    main()
