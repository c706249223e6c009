"""The stages a user runs, as functions: the CLI and the Python API call these.

train_dense -> export_checkpoint -> profile (profiling.profile.profile_onnx).
"""

from __future__ import annotations

import time
from pathlib import Path

from deeplsp.checkpoint import load_checkpoint, save_checkpoint
from deeplsp.datasets import get_dataset, load_split, make_loader
from deeplsp.errors import DeepLSPError
from deeplsp.models import build_model, input_shape, load_pretrained
from deeplsp.training import TrainConfig, evaluate, train
from export import ExportResult, export_onnx
from profiling.counting import count_torch


def train_dense(
    model_name: str,
    dataset: str,
    out: str | Path,
    cfg: TrainConfig,
    *,
    data_dir: str | Path | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    pretrained: bool = False,
    download: bool = False,
    workers: int = 0,
) -> dict:
    """Train a dense model, evaluate it, and save a checkpoint that knows its model."""
    from deeplsp.models import MODELS

    MODELS.get(model_name)  # fail on a bad name before loading any data
    entry = get_dataset(dataset)
    if workers < 0:
        raise DeepLSPError(f"--workers must be >= 0 (got {workers})")
    t0 = time.perf_counter()
    train_ds = load_split(
        dataset, "train", data_dir, subset=train_subset, seed=cfg.seed, download=download
    )
    test_ds = load_split(dataset, "test", data_dir, subset=test_subset, seed=cfg.seed)
    train_loader = make_loader(
        train_ds, cfg.batch_size, shuffle=True, num_workers=workers, seed=cfg.seed
    )
    test_loader = make_loader(test_ds, 256, shuffle=False, num_workers=workers)
    data_s = time.perf_counter() - t0

    build = entry.model_args()
    model = build_model(model_name, **build)
    fresh = None
    if pretrained:
        fresh = load_pretrained(model, model_name, entry.input_size)
    fit = train(model, train_loader, cfg, desc=f"{model_name}/{dataset}")
    t1 = time.perf_counter()
    metrics = evaluate(model, test_loader, cfg.device)
    eval_s = time.perf_counter() - t1
    cost = count_torch(model.cpu(), (1, *input_shape(build)))
    summary = {
        "model": model_name,
        "dataset": dataset,
        "train_samples": len(train_ds),
        "test_samples": len(test_ds),
        "pretrained": pretrained,
        "left_fresh": fresh,
        "test": metrics,
        "cost": cost.to_dict(),
        "train": fit,
        "config": cfg.to_dict(),
        "seconds": {"data": data_s, "train": fit["seconds"], "evaluate": eval_s},
    }
    save_checkpoint(
        out,
        model,
        model_name,
        build,
        dataset=dataset,
        metrics={"test": metrics, "cost": cost.to_dict()},
        config={
            "train": cfg.to_dict(),
            "train_samples": len(train_ds),
            "test_samples": len(test_ds),
            "pretrained": pretrained,
        },
    )
    summary["checkpoint"] = str(out)
    return summary


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    batch: int = 1,
    opset: int = 18,
    simplify: bool = False,
    atol: float = 1e-3,
) -> ExportResult:
    """Export a DeepLSP checkpoint to a verified ONNX file with a fixed input shape."""
    if batch < 1:
        raise DeepLSPError(f"--batch must be >= 1 (got {batch})")
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model()
    return export_onnx(
        model, (batch, *ckpt.input_shape), out, opset=opset, simplify=simplify, atol=atol
    )
