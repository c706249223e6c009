"""What a layer costs inside a network against alone: the case for how the latency table
times a layer (its activation fused in, ONNX Runtime's kernel time without the layout
conversions and the call that only a layer run alone pays).

For each model at the Fashion-MNIST shape (fresh weights), the dense network and `--n`
random pruned variants (every group at a random one of the 8 candidate counts) are
exported and timed on the `cpu` device as the pipeline times them (paired with the dense
model), and profiled once with ONNX Runtime's profiler (per-node kernel times, in a child
process). Every layer signature of those networks is then timed alone three ways:

- `file`: the whole one-layer file by wall time, without the activation (the table to
  session 14, whose files did not end in the sink);
- `kernel`: the profiler's kernel time without the layout conversions and sink, without
  the activation;
- `kernel+act`: the same with the layer's activation in the file (the table since
  session 15).

For each, and for the sum of the profiled in-network nodes (`in-network`: the ceiling, what
an additive model of these networks could reach), a least-squares line from the table sum
and the weight count to the measured latency, left out one network at a time: the share
within +-5% and +-10% and the median error. Results: bench/results/RESULTS.{json,md}.

    .venv/bin/python bench/layer_context.py [--models mobilenet_v3_large,resnet18] [--n 24]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from prune_budget import HERE, SHAPE, paired_timing
from tabulate import tabulate

from deeplsp.atomic import write_json, write_text
from deeplsp.models import build_model
from deeplsp.pruner import RATIOS, LatencyModel, candidate_keeps, measure_model
from deeplsp.structure import find_groups, prune_groups
from devices import fingerprint, get_device
from profiling.isolated import measure_isolated_many
from profiling.latency_table import LatencyTable, layer_onnx

RESULTS = HERE / "results"
PROFILE = """
import json, sys
import numpy as np, onnxruntime as ort
from profiling.onnxruntime_runner import profiled_runs
o = ort.SessionOptions()
o.intra_op_num_threads = int(sys.argv[2]); o.inter_op_num_threads = 1
o.enable_profiling = True; o.profile_file_prefix = sys.argv[3]
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
x = {i.name: np.random.default_rng(0).standard_normal(i.shape).astype(np.float32)
     for i in s.get_inputs()}
for _ in range(50):
    s.run(None, x)
per = {}
for run in profiled_runs(json.load(open(s.end_profiling())), 30):
    for e in run:
        per.setdefault((e["name"], e["args"]["op_name"]), []).append(e["dur"] / 1e3)
print(json.dumps([[n, op, float(np.median(d))] for (n, op), d in per.items()]))
"""


def node_times(path: Path, threads: int, tmp: str) -> list[tuple[str, str, float]]:
    """(node, op, median kernel ms) of a file's nodes over 30 profiled runs, in a child."""
    out = subprocess.run(
        [sys.executable, "-c", PROFILE, str(path), str(threads), f"{tmp}/profile"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [tuple(row) for row in json.loads(out.stdout)]


def loo(features: list[list[float]], measured: list[float]) -> dict:
    """A least-squares line from `features` (+ a constant), each network left out of its
    own fit: its share within +-5% and +-10%, and the median and largest error."""
    x = np.column_stack([np.asarray(features), np.ones(len(measured))])
    y = np.asarray(measured)
    errors = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        coef, *_ = np.linalg.lstsq(x[keep], y[keep], rcond=None)
        errors.append(abs(x[i] @ coef / y[i] - 1))
    e = np.asarray(errors)
    return {
        "within_5": float(np.mean(e <= 0.05)),
        "within_10": float(np.mean(e <= 0.10)),
        "median_error": float(np.median(e)),
        "max_error": float(e.max()),
    }


def whole_files(sigs, threads: int, tmp: str) -> dict[str, float]:
    """Each signature's file timed whole by wall time (one child for them all), as the
    table timed layers to session 14; the table itself now times kernels."""
    paths = []
    for i, sig in enumerate(sigs):
        paths.append(Path(tmp) / f"layer{i}.onnx")
        paths[-1].write_bytes(layer_onnx(sig))
    runs = measure_isolated_many(paths, threads, 20, 100)
    return {sig.key(): stats.median for sig, stats in zip(sigs, runs, strict=True)}


def by_key(got: dict) -> dict[str, float]:
    return {sig.key(): ms for sig, ms in got.items()}


def run_model(name: str, args, device) -> dict:
    model = build_model(name, num_classes=10, in_channels=1, input_size=32).eval()
    groups = find_groups(model, SHAPE)
    candidates = candidate_keeps(groups, RATIOS, device.channel_multiple)
    rng = random.Random(f"layer-context-{args.seed}")
    nets = [{g.id: g.channels for g in groups}]
    nets += [{g: rng.choice(c) for g, c in candidates.items()} for _ in range(args.n)]
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        LatencyTable(device, Path(tmp) / "t.sqlite", warmup=20) as t,
    ):
        lat = LatencyModel(model, SHAPE, groups, t)
        timing, _ = paired_timing(device, model, Path(tmp) / "dense.onnx", args.iters)
        for i, keeps in enumerate(nets):
            pruned = prune_groups(copy.deepcopy(model), SHAPE, keeps)
            path = Path(tmp) / "net.onnx"
            ms = measure_model(pruned, SHAPE, timing, path)["latency"]["median"]
            nodes = node_times(path, device.resolved_threads(), tmp)
            sigs = [lat.sig_at(lk, keeps) for lk in lat.links]
            rows.append({"keeps": keeps, "measured_ms": ms, "nodes": nodes, "sigs": sigs})
            print(f"{name} network {i + 1}/{len(nets)}: {ms:.3f} ms", flush=True)
        every = list({s.key(): s for r in rows for s in r["sigs"]}.values())
        bare = list({s.key(): replace(s, act="") for s in every}.values())
        tables = {
            "file": whole_files(bare, device.resolved_threads(), tmp),
            "kernel": by_key(t.get_many(bare)),
            "kernel+act": by_key(t.get_many(every)),
        }
    measured = [r["measured_ms"] for r in rows]
    weights = [sum(s.weights for s in r["sigs"]) / 1e6 for r in rows]
    sums = {
        "file": [sum(tables["file"][replace(s, act="").key()] for s in r["sigs"]) for r in rows],
        "kernel": [
            sum(tables["kernel"][replace(s, act="").key()] for s in r["sigs"]) for r in rows
        ],
        "kernel+act": [sum(tables["kernel+act"][s.key()] for s in r["sigs"]) for r in rows],
        "in-network": [sum(ms for _, op, ms in r["nodes"] if op in ("Conv", "Gemm")) for r in rows],
    }
    fits = {
        label: loo([[v, w] for v, w in zip(values, weights, strict=True)], measured)
        for label, values in sums.items()
    }
    ratio = [n / k for n, k in zip(sums["in-network"], sums["kernel+act"], strict=True)]
    return {
        "networks": len(rows),
        "fits": fits,
        "in_network_over_table": {
            "median": statistics.median(ratio),
            "min": min(ratio),
            "max": max(ratio),
        },
        "rows": [
            {"measured_ms": m, "weights_m": w, **{k: v[i] for k, v in sums.items()}}
            for i, (m, w) in enumerate(zip(measured, weights, strict=True))
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mobilenet_v3_large,resnet18")
    p.add_argument("--n", type=int, default=24, help="random variants per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--results", default="layer_context")
    args = p.parse_args()
    device = replace(get_device("cpu"), threads=args.threads)
    out = {"fingerprint": fingerprint(device), "n": args.n, "seed": args.seed, "models": {}}
    for name in args.models.split(","):
        out["models"][name] = run_model(name, args, device)
        write_json(RESULTS / f"{args.results}.json", out)
    lines = [
        "# What a layer costs inside a network against alone",
        "",
        f"`cpu` device, {args.threads} ONNX Runtime thread(s), dense + {args.n} random "
        "variants per model, paired timing; a line from table sum and weights to the "
        "measured latency, each network left out of its own fit.",
        "",
    ]
    table = []
    for name, res in out["models"].items():
        for label, fit in res["fits"].items():
            table.append(
                {
                    "model": name,
                    "layers timed": label,
                    "within ±5%": f"{fit['within_5']:.0%}",
                    "within ±10%": f"{fit['within_10']:.0%}",
                    "median error": f"{fit['median_error']:.1%}",
                    "max error": f"{fit['max_error']:.1%}",
                }
            )
    lines += [tabulate(table, headers="keys", tablefmt="github"), ""]
    for name, res in out["models"].items():
        r = res["in_network_over_table"]
        lines.append(
            f"- {name}: in-network convolution and Gemm kernels / `kernel+act` table sum: "
            f"median {r['median']:.2f} (range {r['min']:.2f}-{r['max']:.2f})"
        )
    write_text(RESULTS / f"{args.results}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
