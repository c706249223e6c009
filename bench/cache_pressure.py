"""Does another process's cache traffic move a pruned network's latency relative to the
dense model's? Paired timing (a file's latency = its ratio to the dense model timed
alternately with it) cancels a device that slows everything alike; this measures
whether a neighbour's memory traffic slows them alike.

For each model (1x32x32, fresh weights, ONNX Runtime with one thread): the dense network
and the middle one (every group at its middle candidate, as `calibrate` builds it) are
timed alternately (dense, middle, dense; 100 runs each after 10 warm-up runs) in
`--rounds` rounds per condition, while a second process streams over an array of
`--mb` MB (0: no second process). Conditions alternate (quiet, busy, quiet, ...), so
the machine's own drift does not line up with them. Reports per condition the dense
model's median and the middle network's median ratio to the dense windows around it.

    .venv/bin/python bench/cache_pressure.py [--models resnet18,mobilenet_v3_large]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tabulate import tabulate

from deeplsp.atomic import write_json, write_text
from deeplsp.models import build_model
from deeplsp.pruner import RATIOS, candidate_keeps
from deeplsp.structure import find_groups, prune_groups
from devices import fingerprint, get_device
from export import export_onnx

RESULTS = Path(__file__).parent / "results"
SHAPE = (1, 1, 32, 32)
# The neighbour: adds to every element of its array, over and over (reads and writes).
STREAM = "import numpy as np\na = np.ones({n} // 8)\nwhile True:\n    a += 1.0\n"


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _median_ms(sess: ort.InferenceSession, x: np.ndarray, iters: int = 100) -> float:
    for _ in range(10):
        sess.run(None, {"input": x})
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run(None, {"input": x})
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def measure(name: str, conditions: list[int], rounds: int) -> list[dict]:
    model = build_model(name, num_classes=10, in_channels=1, input_size=SHAPE[-1]).eval()
    groups = find_groups(model, SHAPE)
    candidates = candidate_keeps(groups, RATIOS, get_device("cpu").channel_multiple)
    middle = {g: sorted(c)[len(c) // 2] for g, c in candidates.items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": Path(tmp) / "dense.onnx", "middle": Path(tmp) / "middle.onnx"}
        export_onnx(model, SHAPE, paths["dense"])
        export_onnx(prune_groups(copy.deepcopy(model), SHAPE, middle), SHAPE, paths["middle"])
        sessions = {k: _session(p) for k, p in paths.items()}
        x = np.zeros(SHAPE, np.float32)
        for i, mb in enumerate(conditions):
            neighbour = (
                subprocess.Popen([sys.executable, "-c", STREAM.format(n=mb * 2**20)])
                if mb
                else None
            )
            try:
                time.sleep(1.0)  # the neighbour's array allocated and streaming
                dense, ratios = [], []
                for _ in range(rounds):
                    before = _median_ms(sessions["dense"], x)
                    mid = _median_ms(sessions["middle"], x)
                    after = _median_ms(sessions["dense"], x)
                    dense.append((before + after) / 2)
                    ratios.append(mid / dense[-1])
            finally:
                if neighbour is not None:
                    neighbour.kill()
                    neighbour.wait()
            row = {
                "model": name,
                "step": i + 1,
                "neighbour_mb": mb,
                "dense_ms": round(statistics.median(dense), 3),
                "middle_ms": round(statistics.median(dense) * statistics.median(ratios), 3),
                "middle_of_dense": round(statistics.median(ratios), 3),
            }
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenet_v3_large")
    p.add_argument("--mb", type=int, default=48, help="the neighbour's array (MB)")
    p.add_argument("--pairs", type=int, default=4, help="quiet/busy pairs per model")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--results", default="cache_pressure")
    args = p.parse_args()
    conditions = [0, args.mb] * args.pairs
    rows = [r for name in args.models.split(",") for r in measure(name, conditions, args.rounds)]
    fp = fingerprint(get_device("cpu"))
    write_json(
        RESULTS / f"{args.results}.json", {"fingerprint": fp, "args": vars(args), "rows": rows}
    )
    write_text(
        RESULTS / f"{args.results}.md",
        f"# Cache pressure from a neighbour (`cpu`, {fp['cpu']}, 1 ONNX Runtime thread)\n\n"
        f"Dense and middle networks (1x32x32) timed alternately, {args.rounds} rounds per "
        f"step, while a second process streams over an array of `neighbour_mb` MB (0: none). "
        f"`middle_of_dense`: the middle network's median ratio to the dense windows around "
        f"it, which is what paired timing reports.\n\n"
        + tabulate(rows, headers="keys", tablefmt="github")
        + "\n",
    )


if __name__ == "__main__":
    main()
