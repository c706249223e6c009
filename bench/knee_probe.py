"""How steadily the device's cache knee reads: `profiling.weight_spill`'s chain probe run
`--probes` times, each in a fresh latency table (nothing cached), on the `cpu` device.

Per probe: the knee `fit_knee` reads (None: no knee), the cost per layer and per million
weights past the knee, and the chain's time per layer at every length. `--lengths`
probes longer chains than the pipeline's (`weight_spill.LENGTHS`), to see a knee past
the pipeline's chain. Results: bench/results/RESULTS.{json,md} (`--results`, default
knee_probe).

    .venv/bin/python bench/knee_probe.py [--probes 4] [--threads 1] [--lengths 1,2,...,32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from tabulate import tabulate

from deeplsp.atomic import write_json, write_text
from devices import fingerprint, get_device
from profiling.latency_table import LatencyTable
from profiling.weight_spill import LENGTHS, PROBE, free_weights

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: every core)")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="chain lengths")
    p.add_argument("--results", default="knee_probe", help="file stem under bench/results/")
    args = p.parse_args()
    lengths = [int(k) for k in args.lengths.split(",")]
    device = replace(get_device("cpu"), threads=args.threads)
    rows = []
    for i in range(args.probes):
        with (
            tempfile.TemporaryDirectory() as tmp,
            LatencyTable(device, Path(tmp) / "t.sqlite") as t,
        ):
            t0 = time.perf_counter()
            knee = free_weights(t, lengths=lengths)
            rows.append(
                {
                    "probe": i + 1,
                    "knee_M_weights": "none" if knee.free is None else round(knee.free / 1e6, 2),
                    "per_layer_ms": round(knee.per_layer_ms, 4),
                    "per_M_weights_past_ms": round(knee.per_weight_ms * 1e6, 4),
                    "ms_per_layer_by_length": " ".join(f"{ms / n:.3f}" for n, _, ms in knee.chain),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
        print(rows[-1], flush=True)
    fp = fingerprint(device)
    write_json(
        RESULTS / f"{args.results}.json",
        {"fingerprint": fp, "lengths": lengths, "probe": PROBE.key(), "rows": rows},
    )
    write_text(
        RESULTS / f"{args.results}.md",
        f"# Cache knee probes on `cpu` ({fp['cpu']}, {fp['cores']} threads)\n\n"
        f"Chains of {lengths[0]}-{lengths[-1]} copies of `{PROBE.key()}` "
        f"({lengths[0] * PROBE.weights / 1e6:.1f}-{lengths[-1] * PROBE.weights / 1e6:.1f}M "
        f"weights; lengths {', '.join(map(str, lengths))}), each probe in a fresh table. "
        "`ms_per_layer_by_length`: each chain's time over its length, in that order.\n\n"
        + tabulate(rows, headers="keys", tablefmt="github")
        + "\n",
    )


if __name__ == "__main__":
    main()
