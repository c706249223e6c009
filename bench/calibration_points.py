"""How many random networks the latency calibration needs, from stored runs (no timing).

Every stored run of bench/latency_prediction.py keeps, per variant, its measured latency
and the calibration the pipeline predicted it with (the calibration networks' table sums
and measured ms). This bench refits that calibration (`Calibration.fit`, the smooth
curve) with `k` more random networks on it, drawn from the run's own variants (random
networks drawn as the calibration's random ones are), and scores the other variants:
the share within +-10% of measured, the mean over `--draws` draws of the `k`. A variant's
table sum is the one stored (`table_sum`, since session 23) or, in older runs, the one
the stored calibration maps to its stored prediction (the curve rises, so it is unique).

Results: bench/results/calibration_points.{json,md}.

    .venv/bin/python bench/calibration_points.py [--extra 0,3,6] [--draws 20]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path

from tabulate import tabulate

from deeplsp.atomic import write_json, write_text
from profiling.latency_table import Calibration

RESULTS = Path(__file__).parent / "results"
MIN_POINTS = 8  # runs calibrated on fewer networks (before session 10) are left out


def stored_calibration(c: dict) -> Calibration:
    return Calibration(
        c["scale"],
        c["offset"],
        c["points"],
        c["max_rel_error"],
        tuple(tuple(p) for p in c["fit_points"]),
        c.get("smooth", False),
    )


def table_sum(variant: dict) -> float:
    """The variant's table sum as its calibration saw it (weight cost included)."""
    if "table_sum" in variant:
        return variant["table_sum"]
    cal = stored_calibration(variant["calibration"])
    lo, hi = 1e-6, 1e4
    for _ in range(200):  # bisection in log space
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if cal.predict(mid) < variant["predicted_ms"] else (lo, mid)
    return math.sqrt(lo * hi)


def within(points: list[tuple[float, float]], tests: list[tuple[float, float]]) -> float:
    cal = Calibration.fit([x for x, _ in points], [y for _, y in points], smooth=True)
    return sum(abs(cal.predict(x) / y - 1) <= 0.10 for x, y in tests) / len(tests)


def score_run(variants: list[dict], extra: list[int], draws: int, seed: str) -> dict[int, float]:
    points = [tuple(p) for p in variants[-1]["calibration"]["fit_points"]]
    pairs = [(table_sum(v), v["measured_ms"]) for v in variants]
    rng = random.Random(seed)
    out = {}
    for k in extra:
        shares = []
        for _ in range(draws if k else 1):
            order = rng.sample(range(len(pairs)), len(pairs))
            added = [pairs[i] for i in order[:k]]
            shares.append(within(points + added, [pairs[i] for i in order[k:]]))
        out[k] = statistics.mean(shares)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extra", default="0,3,6", help="random networks added, comma-separated")
    p.add_argument("--draws", type=int, default=20)
    args = p.parse_args()
    extra = [int(k) for k in args.extra.split(",")]
    rows = []
    for path in sorted(RESULTS.glob("latency_prediction-*.json")):
        state = json.loads(path.read_text())
        for model, entry in state.get("models", {}).items():
            variants = [v for v in entry.get("variants", []) if "calibration" in v]
            if len(variants) < 10 or any(
                len(v["calibration"].get("fit_points", ())) < MIN_POINTS for v in variants
            ):
                continue
            shares = score_run(variants, extra, args.draws, f"{path.stem}-{model}")
            rows.append(
                {
                    "run": path.stem.removeprefix("latency_prediction-"),
                    "model": model,
                    "variants": len(variants),
                    "calibration_networks": len(variants[-1]["calibration"]["fit_points"]),
                    "cpu": state.get("fingerprint", {}).get("cpu", "?"),
                    **{f"+{k}": round(100 * s, 1) for k, s in shares.items()},
                }
            )
    summary = {
        f"+{k}": {
            "mean": round(statistics.mean(r[f"+{k}"] for r in rows), 1),
            "worst": min(r[f"+{k}"] for r in rows),
            "runs_at_95": sum(r[f"+{k}"] >= 95 for r in rows),
        }
        for k in extra
    }
    write_json(RESULTS / "calibration_points.json", {"rows": rows, "summary": summary})
    table = tabulate(rows, headers="keys", tablefmt="github")
    totals = tabulate(
        [{"added": k, **v} for k, v in summary.items()], headers="keys", tablefmt="github"
    )
    write_text(
        RESULTS / "calibration_points.md",
        "# Calibration networks: the share of variants within +-10% with k more random "
        f"networks on the curve\n\nStored latency_prediction runs with at least {MIN_POINTS} "
        f"calibration networks; `+k`: the share (%) of the other variants within +-10%, "
        f"mean over {args.draws} draws of the k from the run's own variants.\n\n{table}\n\n"
        f"Over the {len(rows)} runs:\n\n{totals}\n",
    )
    print(table, "\n\n", totals, sep="")


if __name__ == "__main__":
    main()
