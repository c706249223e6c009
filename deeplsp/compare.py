"""The batch comparison: every pruner on every dataset, measured the same way.

    python3 main.py resnet18 cifar10 cifar100 fashionmnist
    deeplsp compare resnet18 fashionmnist --pruners SNIP,DeepLSP --quick

Per dataset the dense model is trained (or loaded) once; each method gets a
copy, real data and the same training budget, and returns a pruned model that
`evaluate_outcome` measures like every other: accuracy, sparsity, non-zero
parameters, MACs, ONNX verified against PyTorch, its size and gzip size, latency
on the device. Each (model, dataset, method) cell is written atomically as soon
as it exists; a rerun skips finished cells, so an interrupted grid loses nothing
done.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deeplsp.atomic import write_json, write_text
from deeplsp.checkpoint import load_checkpoint, save_checkpoint
from deeplsp.datasets import calibration_batches, get_dataset, load_split, make_loader
from deeplsp.errors import DeepLSPError, first_line
from deeplsp.masks import sparsity
from deeplsp.methods import METHODS, Outcome, PruneJob, config_dict
from deeplsp.models import MODELS, input_shape
from deeplsp.structure import find_groups
from deeplsp.training import evaluate, short_budget
from devices import DeviceSpec, get_device, resolve_device
from profiling import target
from profiling.counting import count_torch

RESULT = "result.json"
# the seed's table order, DeepLSP first; methods registered later follow
ORDER = (
    "DeepLSP", "NetworkPruner", "GrowingRegularization", "LearnableThreshold",
    "LossModelPruner", "HybridPruner", "StructuredPruning", "SNIP", "WeightToNodePruning",
    "L1StructuredPruning", "ADMMPruner",
)  # fmt: skip


def load_methods() -> None:
    """Import every method module so they register (DeepLSP and the ten baselines)."""
    import baselines  # noqa: F401
    import deeplsp.pruner  # noqa: F401


@dataclass
class CompareConfig:
    model: str
    datasets: list[str]
    out: str = "runs/compare"
    pruners: list[str] | None = None  # None: all registered
    device: str = "cpu"
    device_url: str | None = None  # measure through the agent there (else env / config)
    quick: bool = False
    epochs: int = 1  # training budget of every method
    dense_epochs: int = 1
    train_subset: int | None = None
    test_subset: int | None = None
    data_dir: str | None = None
    overrides: dict[str, list[str]] = field(default_factory=dict)  # method -> key=value
    retry_failed: bool = False
    seed: int = 0
    warmup: int = 10
    iters: int = 50

    def __post_init__(self) -> None:
        load_methods()
        MODELS.get(self.model)
        get_device(self.device)
        if not self.datasets:
            raise DeepLSPError("give at least one dataset")
        for name in self.datasets:
            get_dataset(name)
        if self.pruners is None:
            rank = {name: i for i, name in enumerate(ORDER)}
            self.pruners = sorted(METHODS.names(), key=lambda n: rank.get(n, len(ORDER)))
        for name in self.pruners:
            METHODS.get(name)
        for name, items in self.overrides.items():
            METHODS.get(name).config(items)  # fail before any training on a bad --set
        if self.epochs < 0 or self.dense_epochs < 0:
            raise DeepLSPError("epochs must be >= 0")
        if self.quick:
            self.train_subset = self.train_subset or 512
            self.test_subset = self.test_subset or 256
            self.epochs = min(self.epochs, 1)
            self.iters = min(self.iters, 20)


def channels_of(model: torch.nn.Module, shape: tuple[int, ...]) -> dict[str, int]:
    return {g.id: g.channels for g in find_groups(model, shape)}


def evaluate_outcome(
    job: PruneJob,
    outcome: Outcome,
    test_loader,
    dense: dict,
    cell: Path,
    warmup: int = 10,
    iters: int = 50,
) -> dict:
    """Everything measured the same way for every method; writes model.onnx and pruned.pt."""
    from deeplsp.pruner import Timing, measure_model

    model = outcome.model.cpu().eval()
    top = evaluate(model, test_loader, "cpu")
    sp = sparsity(model)
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    channels = channels_of(model, job.shape)
    kept = sum(channels.get(g, 0) for g in dense["channels"]) / sum(dense["channels"].values())
    measured = measure_model(
        model, job.shape, Timing(job.device, warmup, iters), cell / "model.onnx"
    )
    onnx_bytes = (cell / "model.onnx").read_bytes()
    latency = measured["latency"]
    achieved = {
        "sparsity": sp["global"],
        "channel_reduction": 1 - kept,
        "latency_ms": latency["median"],
    }[outcome.target_metric]
    save_checkpoint(
        cell / "pruned.pt",
        model,
        job.model_name,
        job.build,
        dataset=job.dataset,
        metrics={"test": top},
        channels=outcome.channels or (channels if outcome.structured else None),
    )
    return {
        "top1_dense": dense["test"]["top1"],
        "top1": top["top1"],
        "top5": top["top5"],
        "target_metric": outcome.target_metric,
        "target": outcome.target,
        "achieved": achieved,
        "gap": achieved - outcome.target,
        "exact": outcome.exact,
        "structured": outcome.structured,
        "sparsity": sp["global"],
        "channel_reduction": 1 - kept,
        "params": params,
        "nonzero_params": nonzero,
        "macs": count_torch(model, job.shape).macs,
        "onnx_bytes": len(onnx_bytes),
        "onnx_gzip_bytes": len(gzip.compress(onnx_bytes, 6)),
        "onnx_max_abs_diff": measured["export"]["max_abs_diff"],
        "latency_ms": latency["median"],
        "latency_p90_ms": latency["p90"],
        "speedup": dense["latency_ms"]["median"] / latency["median"],
        "per_layer_sparsity": sp["per_layer"],
        "info": outcome.info,
    }


def _dense(
    cfg: CompareConfig, device: DeviceSpec, dataset: str, root: Path, log
) -> tuple[torch.nn.Module, dict]:
    """Train (or load) the dense model once per dataset, and measure it once."""
    from deeplsp.pipeline import train_dense
    from deeplsp.pruner import Timing, measure_model

    ckpt_path, info_path = root / "dense.pt", root / "dense.json"
    if not ckpt_path.exists():
        log(f"{dataset}: training the dense {cfg.model} ({cfg.dense_epochs} epoch(s))")
        tcfg = short_budget(cfg.dense_epochs, cfg.seed)
        train_dense(
            cfg.model,
            dataset,
            ckpt_path,
            tcfg,
            data_dir=cfg.data_dir,
            train_subset=cfg.train_subset,
            test_subset=cfg.test_subset,
        )
    model = load_checkpoint(ckpt_path, expect_model=cfg.model).build_model().eval()
    if info_path.exists():
        return model, json.loads(info_path.read_text())
    test = load_split(dataset, "test", cfg.data_dir, subset=cfg.test_subset, seed=cfg.seed)
    shape = _shape(device, dataset)
    measured = measure_model(model, shape, Timing(device, cfg.warmup, cfg.iters))
    info = {
        "test": evaluate(model, make_loader(test, 256, shuffle=False), "cpu"),
        "latency_ms": measured["latency"],
        "onnx_bytes": measured["export"]["size_bytes"],
        "params": sum(p.numel() for p in model.parameters()),
        "macs": count_torch(model, shape).macs,
        "channels": channels_of(model, shape),
    }
    write_json(info_path, info)
    return model, info


def _shape(device: DeviceSpec, dataset: str) -> tuple[int, ...]:
    return (device.batch, *input_shape(get_dataset(dataset).model_args()))


def run_compare(cfg: CompareConfig, log: Callable[[str], None] = print) -> dict:
    """Run the grid (resuming), then write results.{csv,json,md} and the plots."""
    from deeplsp.report import write_comparison

    out = Path(cfg.out)
    device = resolve_device(cfg.device, cfg.device_url)
    cells: list[dict] = []
    total = len(cfg.datasets) * len(cfg.pruners)
    done = 0
    for dataset in cfg.datasets:
        root = out / f"{cfg.model}-{dataset}"
        try:
            load_split(dataset, "test", cfg.data_dir, subset=8)
        except DeepLSPError as exc:
            log(f"{dataset}: skipped, {exc}")
            cells.append({"model": cfg.model, "dataset": dataset, "skipped": str(exc)})
            done += len(cfg.pruners)
            continue
        dense, dense_info = _dense(cfg, device, dataset, root, log)
        train = load_split(dataset, "train", cfg.data_dir, subset=cfg.train_subset, seed=cfg.seed)
        test = load_split(dataset, "test", cfg.data_dir, subset=cfg.test_subset, seed=cfg.seed)
        test_loader = make_loader(test, 256, shuffle=False)
        n_calib = 2 if cfg.quick else 4
        job_base = dict(
            model_name=cfg.model,
            dataset=dataset,
            build=get_dataset(dataset).model_args(),
            dense=dense,
            shape=_shape(device, dataset),
            train_loader=make_loader(train, 64, shuffle=True, seed=cfg.seed),
            calib=calibration_batches(dataset, cfg.data_dir, n_calib, 32, cfg.seed),
            # a different seed draws other training images: held out from the
            # calibration batches, for methods that score candidates on validation data
            val=calibration_batches(dataset, cfg.data_dir, n_calib, 32, cfg.seed + 1),
            train_cfg=short_budget(cfg.epochs, cfg.seed),
            device=device,
            seed=cfg.seed,
            quick=cfg.quick,
            data_dir=cfg.data_dir,
            dense_checkpoint=root / "dense.pt",
            train_subset=cfg.train_subset,
            test_subset=cfg.test_subset,
            log=log,
        )
        for name in cfg.pruners:
            done += 1
            cell = root / name
            tag = f"[{done}/{total}] {cfg.model}/{dataset}/{name}"
            result_path = cell / RESULT
            if result_path.exists():
                previous = json.loads(result_path.read_text())
                if not (cfg.retry_failed and previous.get("error")):
                    log(f"{tag}: done before, skipped")
                    cells.append(previous)
                    continue
            cells.append(_run_cell(cfg, name, job_base, cell, test_loader, dense_info, tag, log))
    summary = {
        "config": dataclasses.asdict(cfg),
        "quick": cfg.quick,
        "fingerprint": target.fingerprint(device),
        "cells": cells,
    }
    write_comparison(out, summary)
    return summary


def _run_cell(cfg, name, job_base, cell, test_loader, dense_info, tag, log) -> dict:
    """One method on one dataset; its error is recorded, never raised (the grid goes on)."""
    method = METHODS.get(name)
    mcfg = method.config(cfg.overrides.get(name, []))
    cell.mkdir(parents=True, exist_ok=True)
    job = PruneJob(**job_base, work_dir=cell)
    row = {
        "model": cfg.model,
        "dataset": job.dataset,
        "method": name,
        "kind": method.kind,
        "quick": cfg.quick,
        "config": config_dict(mcfg),
        "train_epochs": cfg.epochs,
    }
    log(f"{tag}: running")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    try:
        outcome = method.run(job, mcfg)
        row.update(
            evaluate_outcome(job, outcome, test_loader, dense_info, cell, cfg.warmup, cfg.iters)
        )
        row["error"] = None
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a failing method is a result of the comparison, not a crash
        row["error"] = f"{type(exc).__name__}: {first_line(exc)}"
        write_text(cell / "traceback.txt", traceback.format_exc())
    row["seconds"] = time.perf_counter() - t0
    write_json(cell / RESULT, row)
    if row["error"]:
        log(f"{tag}: FAILED after {row['seconds']:.0f} s: {row['error']}")
    else:
        log(
            f"{tag}: done in {row['seconds']:.0f} s: top-1 {row['top1']:.3f}, "
            f"{row['latency_ms']:.3f} ms, {row['target_metric']} {row['achieved']:.3f} "
            f"(target {row['target']:.3f})"
        )
    return row
