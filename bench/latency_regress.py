"""How stable the latency regression suite's figures are from run to run, and what
measuring through the agent costs.

1. Stability: DeepLSP's own suite (tests/regression/suite.toml) measured `--runs` times
   in each of three ways, alternating: the suite's way (ratio to the reference of the
   same round, every round interleaved in one process, median over rounds), the same
   ratios with a fresh process per round, and plain absolute medians. For each model:
   the spread of the run figures (max / min - 1) and the largest deviation of a run from
   the median run, which is the tolerance a suite needs so that an unchanged model never
   fails.
2. The agent: the suite's models measured locally and through a `deeplsp agent serve`
   on 127.0.0.1 (a real process, the `cpu` device), alternating, `--runs` times:
   the median ratio remote / local (same ONNX Runtime in a child process on both sides,
   so it should be 1 within noise) and the wall time per request.

Results: bench/results/latency_regress.{json,md}.

    .venv/bin/python bench/latency_regress.py [--runs 6]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from tabulate import tabulate

from deeplsp.atomic import write_json, write_text
from deeplsp.regress import export_model, load_suite, measure_suite
from devices import get_device, resolve_device
from profiling import target

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
SUITE = ROOT / "tests" / "regression" / "suite.toml"


def process_per_round(device, paths, warmup, iters, rounds):
    """Each round's measurements in a call of its own (a fresh process on the cpu)."""
    out = []
    for r in range(rounds):
        order = paths[r % len(paths) :] + paths[: r % len(paths)]
        out += list(zip(order, target.measure_many(device, order, warmup, iters), strict=True))
    return out


def stability(suite, device, workdir, runs: int) -> dict:
    files = {m.name: export_model(m, suite, device, workdir) for m in suite.models}
    figures: dict[str, dict[str, list[float]]] = {
        way: {n: [] for n in files} for way in ("suite", "process_per_round", "absolute")
    }
    fp = target.fingerprint(device)
    for run in range(runs):
        res = measure_suite(suite, device, workdir, fingerprint=fp, log=lambda m: None)
        for n, r in res.models.items():
            figures["suite"][n].append(r["ratio"])
            figures["absolute"][n].append(r["latency_ms"])
        measured = process_per_round(device, list(files.values()), suite.warmup, suite.iters,
                                     suite.rounds)  # fmt: skip
        per_round: dict[str, list[float]] = {n: [] for n in files}
        by_path = {v: k for k, v in files.items()}
        for path, stats in measured:
            per_round[by_path[path]].append(stats.median)
        ref = per_round[suite.reference]
        for n, times in per_round.items():
            ratios = [t / rt for t, rt in zip(times, ref, strict=True)]
            figures["process_per_round"][n].append(statistics.median(ratios))
        print(f"run {run + 1}/{runs}", flush=True)
    out = {}
    for way, per_model in figures.items():
        out[way] = {}
        for n, xs in per_model.items():
            mid = statistics.median(xs)
            out[way][n] = {
                "runs": xs,
                "spread": max(xs) / min(xs) - 1,
                "max_deviation": max(abs(x / mid - 1) for x in xs),
            }
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_cost(suite, device, workdir, runs: int) -> dict:
    files = [export_model(m, suite, device, workdir) for m in suite.models]
    token = "bench-token-" + os.urandom(12).hex()
    port = free_port()
    env = {**os.environ, "DEEPLSP_AGENT_TOKEN": token}
    env.pop("DEEPLSP_DEVICE_URL", None)
    cmd = [sys.executable, "-m", "deeplsp", "agent", "serve", "--device", "cpu",
           "--port", str(port), "--threads", str(device.threads)]  # fmt: skip
    agent = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ["DEEPLSP_AGENT_TOKEN"] = token
    try:
        remote = resolve_device(device.name, f"http://127.0.0.1:{port}", config={})
        remote = replace(remote, threads=device.threads)
        deadline = time.monotonic() + 60
        while True:
            try:
                target.fingerprint(remote)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                target._remote_info.cache_clear()  # it was not up yet
                time.sleep(0.5)
        ratios = {p.stem: [] for p in files}
        walls = []
        for _ in range(runs):
            for p in files:
                local = target.measure(device, p, suite.warmup, suite.iters, repeats=1)
                t0 = time.perf_counter()
                far = target.measure(remote, p, suite.warmup, suite.iters, repeats=1)
                walls.append(time.perf_counter() - t0)
                ratios[p.stem].append(far.median / local.median)
        return {
            "ratio_remote_over_local": {k: statistics.median(v) for k, v in ratios.items()},
            "request_wall_s_median": statistics.median(walls),
        }
    finally:
        agent.terminate()
        agent.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=6)
    args = ap.parse_args()
    suite = load_suite(SUITE)
    device = replace(get_device("cpu"), threads=suite.threads)
    with tempfile.TemporaryDirectory() as tmp:
        stab = stability(suite, device, Path(tmp), args.runs)
        agent = agent_cost(suite, device, Path(tmp), max(3, args.runs // 2))
    result = {
        "suite": str(SUITE.relative_to(ROOT)),
        "runs": args.runs,
        "fingerprint": target.fingerprint(device),
        "stability": stab,
        "agent": agent,
    }
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "latency_regress.json", result)
    table = tabulate(
        [
            (
                n,
                f"{stab['suite'][n]['max_deviation']:.1%}",
                f"{stab['process_per_round'][n]['max_deviation']:.1%}",
                f"{stab['absolute'][n]['max_deviation']:.1%}",
            )
            for n in stab["suite"]
        ],
        headers=(
            "model",
            "suite: ratio, one process",
            "ratio, process per round",
            "absolute median",
        ),
        tablefmt="github",
    )
    agent_rows = tabulate(
        [(k, f"{v:.3f}") for k, v in agent["ratio_remote_over_local"].items()],
        headers=("ONNX file", "median remote / local latency"),
        tablefmt="github",
    )
    fp = result["fingerprint"]
    md = f"""# Latency regression suite: stability and agent cost

`{result["suite"]}` on `cpu` ({fp.get("cpu")}, {fp.get("cores")} thread(s)), {args.runs} runs
of each way, alternating. Largest deviation of one run's figure from the median run
(the tolerance an unchanged model needs never to fail):

{table}

Through a `deeplsp agent serve` on 127.0.0.1 (median of {max(3, args.runs // 2)} runs per file;
same ONNX Runtime child process on both sides):

{agent_rows}

Median wall time of one profile request through the agent: {agent["request_wall_s_median"]:.2f} s.
"""
    write_text(RESULTS / "latency_regress.md", md)
    print(md)


if __name__ == "__main__":
    main()
