"""Measure ONNX files with ONNX Runtime in a fresh process.

Measured here: a pruned ResNet-18 timed in the process that had just fine-tuned
it took 5.46 ms; the same file in a fresh process, 4.39 ms. Heavy torch work
(training, export) leaves the process in a state that slows ONNX Runtime by
10-25%, and twice that for the tiny one-layer models of the latency table (the
21 layers of the smallest ResNet-18 candidate summed to 1.50 ms in-process and
0.70 ms in a child). So every timing on the `cpu` device, whole models and
table layers alike, runs in a child process that imports ONNX Runtime and numpy
only (no torch; it starts in well under a second). One child measures a whole
list of files and reports each as soon as it is timed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from deeplsp.errors import DeepLSPError
from profiling.runner import LatencyStats

TIMEOUT_S = 900  # per file


def measure_isolated_many(
    paths: Sequence[str | Path],
    threads: int,
    warmup: int,
    iters: int,
    repeats: int = 1,
    kernels_except: Sequence[str] | None = None,
) -> Iterator[LatencyStats]:
    """Each file's stats, in order, as soon as the child has timed it.

    With `repeats` > 1 a file's stats are the middle of that many timed windows
    (by median): one burst of load on a shared machine shifts a whole window,
    which a median inside it cannot undo. With `kernels_except`, kernel times
    (`OnnxRuntimeRunner`'s).
    """
    if not paths:
        return
    ops = "-" if kernels_except is None else ",".join(kernels_except)
    cmd = [sys.executable, "-m", "profiling.isolated", str(threads), str(warmup), str(iters),
           str(repeats), ops, *map(str, paths)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for path in paths:
            line = proc.stdout.readline()
            if not line:
                proc.wait(timeout=TIMEOUT_S)
                lines = proc.stderr.read().strip().splitlines()
                why = lines[-1] if lines else f"exit code {proc.returncode}"
                raise DeepLSPError(f"measuring {path} failed: {why}")
            yield LatencyStats(**json.loads(line))
        proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:  # the caller stopped early, or was interrupted
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def measure_isolated(
    path: str | Path,
    threads: int,
    warmup: int,
    iters: int,
    repeats: int = 3,
    kernels_except: Sequence[str] | None = None,
) -> LatencyStats:
    """One file's stats: the middle of `repeats` timed windows, measured in a child process."""
    runs = measure_isolated_many([path], threads, warmup, iters, repeats, kernels_except)
    return next(iter(runs))


def main(argv: list[str]) -> None:
    from profiling.onnxruntime_runner import OnnxRuntimeRunner

    threads, warmup, iters, repeats = map(int, argv[:4])
    kernels_except = None if argv[4] == "-" else argv[4].split(",")
    for path in argv[5:]:
        with OnnxRuntimeRunner(path, threads=threads, kernels_except=kernels_except) as runner:
            runs = sorted(
                (runner.measure(warmup=warmup, iters=iters) for _ in range(repeats)),
                key=lambda s: s.median,
            )
        print(json.dumps(runs[len(runs) // 2].to_dict()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
