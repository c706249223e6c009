"""Where the `cpu` device's timing noise on a small network comes from, and whether a
different window would remove it.

MobileNetV3-L at 32 px runs in about 1 ms here; session 7 saw its paired ratio to the
dense model move by up to 25% between timings of one file. This bench times, with ONNX
Runtime as DeepLSP's child process does (`OnnxRuntimeRunner`, same session options), in
`--sweeps` passes over each `--threads` count in turn (so drift over time shows as
differences between passes):

- the dense file: 20 windows of 50 runs in one session, and 20 fresh sessions of one
  window each;
- the paired ratio pruned / dense (`profiling.target.measure_relative`'s arithmetic:
  R P R P ... R, 5 rounds, each P against the geometric mean of the R either side),
  `--repeats` times under four window schemes: a fresh session per window (what DeepLSP
  does) or one session per file for all rounds, and windows of 50 runs or of at least
  250 ms.

Reports each measurement's median, coefficient of variation and (p90 - p10) / median
pooled over passes, and its median per pass. Writes bench/results/<--results>.{json,md}.

    .venv/bin/python bench/timing_noise.py [--model mobilenet_v3_large] [--keep 0.4] \
        [--threads 1,2] [--sweeps 3] [--results timing_noise]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from deeplsp.atomic import write_json, write_text
from deeplsp.models import build_model
from deeplsp.structure import find_groups, prune_groups, round_channels
from devices import fingerprint, get_device
from export.onnx_export import export_onnx
from profiling.onnxruntime_runner import OnnxRuntimeRunner

HERE = Path(__file__).parent
SHAPE = (1, 1, 32, 32)


def window(runner: OnnxRuntimeRunner, feed: dict, iters: int, min_ms: float | None) -> float:
    """Median of one window: `iters` runs, or runs until `min_ms` have passed."""
    for _ in range(10):
        runner.infer(feed)
    samples, end = [], time.perf_counter() + (min_ms or 0) / 1e3
    while len(samples) < iters or time.perf_counter() < end:
        t0 = time.perf_counter()
        runner.infer(feed)
        samples.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(samples))


def paired_ratio(paths, threads, feed, rounds, fresh, iters, min_ms) -> float:
    """pruned / dense as measure_relative computes it, windows per the scheme."""
    dense, pruned = paths
    open_ = {}

    def timed(path):
        if fresh:
            with OnnxRuntimeRunner(path, threads=threads) as r:
                return window(r, feed, iters, min_ms)
        if path not in open_:
            open_[path] = OnnxRuntimeRunner(path, threads=threads).__enter__()
        return window(open_[path], feed, iters, min_ms)

    runs = [timed(p) for p in [dense, pruned] * rounds + [dense]]
    for r in open_.values():
        r.deactivate()
    ref, own = runs[0::2], runs[1::2]
    return float(np.median([own[i] / (ref[i] * ref[i + 1]) ** 0.5 for i in range(rounds)]))


def summary(values: list[float]) -> dict:
    v = np.asarray(values)
    return {
        "median": round(float(np.median(v)), 4),
        "cv": round(float(v.std(ddof=1) / v.mean()), 3),
        "p10_p90_of_median": round(
            float((np.percentile(v, 90) - np.percentile(v, 10)) / np.median(v)), 3
        ),
        "min": round(float(v.min()), 4),
        "max": round(float(v.max()), 4),
        "n": len(v),
    }


SCHEMES = (
    ("fresh session per window, 50 runs (DeepLSP)", True, None),
    ("one session per file, 50 runs", False, None),
    ("fresh session per window, >= 250 ms", True, 250.0),
    ("one session per file, >= 250 ms", False, 250.0),
)


def sweep(paths, threads, repeats) -> dict[str, list[float]]:
    """One pass of every measurement at `threads`; values keyed by what was measured."""
    feed = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    got = {}
    with OnnxRuntimeRunner(paths[0], threads=threads) as r:
        feed = {next(iter(r.input_specs())): feed}
        got["dense ms, windows in one session"] = [window(r, feed, 50, None) for _ in range(20)]
    got["dense ms, one window per session"] = []
    for _ in range(20):
        with OnnxRuntimeRunner(paths[0], threads=threads) as r:
            got["dense ms, one window per session"].append(window(r, feed, 50, None))
    for label, fresh, min_ms in SCHEMES:
        got[f"ratio, {label}"] = [
            paired_ratio(paths, threads, feed, 5, fresh, 50, min_ms) for _ in range(repeats)
        ]
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v3_large")
    p.add_argument("--keep", type=float, default=0.4, help="keep ratio of the pruned file")
    p.add_argument("--repeats", type=int, default=10, help="paired ratios per scheme per sweep")
    p.add_argument("--threads", default="1,2", help="ONNX Runtime thread counts, interleaved")
    p.add_argument("--sweeps", type=int, default=3, help="passes over every thread count")
    p.add_argument("--results", default="timing_noise", help="file stem under bench/results/")
    args = p.parse_args()

    device = get_device("cpu")
    threads = [int(t) for t in args.threads.split(",")]
    torch.manual_seed(0)
    dense = build_model(args.model, 10, 1, SHAPE[-1]).eval()
    keep = {
        g.id: round_channels(g.channels, args.keep, device.channel_multiple)
        for g in find_groups(dense, SHAPE)
    }
    raw: dict[str, dict[str, list[list[float]]]] = {str(t): {} for t in threads}
    with tempfile.TemporaryDirectory(prefix="timing-noise-") as tmp:
        paths = (Path(tmp) / "dense.onnx", Path(tmp) / "pruned.onnx")
        export_onnx(dense, SHAPE, paths[0])
        export_onnx(prune_groups(copy.deepcopy(dense), SHAPE, keep), SHAPE, paths[1])
        for s in range(args.sweeps):
            for t in threads:
                for what, values in sweep(paths, t, args.repeats).items():
                    raw[str(t)].setdefault(what, []).append(values)
                    print(f"sweep {s + 1}, {t} thread(s): {what}: {summary(values)}", flush=True)
    table = []
    for t in threads:
        for what, per_sweep in raw[str(t)].items():
            pooled = [v for values in per_sweep for v in values]
            table.append(
                {
                    "threads": t,
                    "what": what,
                    **summary(pooled),
                    "median per sweep": " / ".join(f"{np.median(v):.3f}" for v in per_sweep),
                }
            )
    fp = fingerprint(device)
    write_json(
        HERE / "results" / f"{args.results}.json",
        {"fingerprint": fp, "args": vars(args), "rows": table, "raw": raw},
    )
    write_text(
        HERE / "results" / f"{args.results}.md",
        f"# Timing noise on `cpu` ({fp['cpu']}, {fp['cores']} cores): {args.model} at "
        f"1x32x32, the pruned file keeps {args.keep:g} of every group\n\n"
        f"{args.sweeps} sweeps, each over thread counts {args.threads}; ratios are pruned / "
        f"dense over 5 rounds (R P R P ... R), {args.repeats} per scheme per sweep; cv and "
        f"spread pooled over sweeps.\n\n"
        + tabulate(table, headers="keys", tablefmt="github")
        + "\n",
    )


if __name__ == "__main__":
    main()
