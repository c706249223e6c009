"""Baseline costs of the four dense models on this machine: the numbers later
latency budgets are set against.

For each model at the Fashion-MNIST shape (1x32x32, 10 classes, fresh weights:
latency does not depend on weight values) it records MACs, parameters, training
throughput (images/s, median of timed batches on random tensors, so data
loading is excluded), ONNX export time, and ONNX Runtime latency at batch 1 on
the `cpu` device (median and p90). Results go to bench/results/foundation.json
and foundation.md.

    .venv/bin/python bench/foundation.py [--models resnet18,vgg16] [--iters 100]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from deeplsp.atomic import write_json, write_text
from deeplsp.models import MODELS, build_model
from devices import fingerprint, get_device
from export import export_onnx
from profiling.counting import count_torch
from profiling.profile import profile_onnx

RESULTS = Path(__file__).parent / "results"


def train_throughput(model: torch.nn.Module, shape: tuple, batch: int, steps: int) -> float:
    """Median images/s over `steps` SGD steps after two warm-up steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    model.train()
    rates = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            rates.append(batch / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS.names()))
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--train-batch", type=int, default=32)
    args = p.parse_args()

    device = get_device("cpu")
    shape = (1, 32, 32)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(name, num_classes=10, in_channels=1, input_size=32)
        cost = count_torch(model, (1, *shape))
        rate = train_throughput(model, shape, args.train_batch, args.train_steps)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = export_onnx(model, (1, *shape), Path(tmp) / f"{name}.onnx")
            export_s = time.perf_counter() - t0
            prof = profile_onnx(res.path, device, warmup=20, iters=args.iters)
        lat = prof["latency_ms"]
        rows.append(
            {
                "model": name,
                "params": cost.params,
                "macs": cost.macs,
                "train_images_per_s": round(rate, 1),
                "export_s": round(export_s, 2),
                "exporter": res.exporter,
                "onnx_mb": round(res.size_bytes / 1e6, 2),
                "latency_median_ms": round(lat["median"], 3),
                "latency_p90_ms": round(lat["p90"], 3),
                "latency_n": lat["n"],
            }
        )
        print(rows[-1], flush=True)

    fp = fingerprint(device)
    write_json(
        RESULTS / "foundation.json",
        {"fingerprint": fp, "input": list(shape), "train_batch": args.train_batch, "rows": rows},
    )
    table = tabulate(rows, headers="keys", tablefmt="github")
    write_text(
        RESULTS / "foundation.md",
        f"# Dense model costs on `cpu` ({fp['cpu']}, {fp['cores']} threads, "
        f"onnxruntime {fp['runtime']['onnxruntime']})\n\n"
        f"Input 1x32x32 (Fashion-MNIST), batch 1 latency over {args.iters} runs after 20 "
        f"warm-up runs; training throughput is the median of {args.train_steps} SGD steps at "
        f"batch {args.train_batch} on random tensors (no data loading).\n\n{table}\n",
    )
    print(table)


if __name__ == "__main__":
    main()
