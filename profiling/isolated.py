"""Measure an ONNX file with ONNX Runtime in a fresh process.

Measured here: a pruned ResNet-18 timed in the process that had just fine-tuned
it took 5.46 ms; the same file in a fresh process, 4.39 ms. Heavy torch work
(training, export) leaves the process in a state that slows ONNX Runtime by
10-25%, so the pipeline times every candidate in a child process that imports
ONNX Runtime and numpy only (no torch; it starts in well under a second).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from deeplsp.errors import DeepLSPError
from profiling.runner import LatencyStats


def measure_isolated(
    path: str | Path, threads: int, warmup: int, iters: int, repeats: int = 3
) -> LatencyStats:
    """The middle of `repeats` timed windows (by median), measured in a child process."""
    cmd = [
        sys.executable,
        "-m",
        "profiling.isolated",
        str(path),
        str(threads),
        str(warmup),
        str(iters),
        str(repeats),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise DeepLSPError(f"measuring {path} failed: {lines[-1] if lines else proc.returncode}")
    return LatencyStats(**json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str]) -> None:
    from profiling.onnxruntime_runner import OnnxRuntimeRunner

    path, threads, warmup, iters, repeats = argv[0], *map(int, argv[1:5])
    with OnnxRuntimeRunner(path, threads=threads) as runner:
        # one burst of load on a shared machine shifts a whole window, which a median
        # inside it cannot undo: keep the middle window
        runs = sorted(
            (runner.measure(warmup=warmup, iters=iters) for _ in range(repeats)),
            key=lambda s: s.median,
        )
    print(json.dumps(runs[len(runs) // 2].to_dict()))


if __name__ == "__main__":
    main(sys.argv[1:])
