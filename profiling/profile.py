"""Measure an ONNX model on a device: latency, cost and the device fingerprint."""

from __future__ import annotations

from pathlib import Path

from deeplsp.errors import DeepLSPError
from devices import DeviceSpec, fingerprint
from profiling.counting import count_onnx
from profiling.onnxruntime_runner import OnnxRuntimeRunner
from profiling.runner import Runner


def open_runner(device: DeviceSpec, model: str | Path | bytes) -> Runner:
    """The runner for a device's backend (not yet activated)."""
    if device.backend == "onnxruntime":
        return OnnxRuntimeRunner(model, threads=device.resolved_threads())
    raise DeepLSPError(f"device {device.name!r} uses backend {device.backend!r}, not supported yet")


def profile_onnx(path: str | Path, device: DeviceSpec, warmup: int = 20, iters: int = 100) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DeepLSPError(f"ONNX file {path} does not exist")
    if warmup < 0 or iters < 1:
        raise DeepLSPError(f"--warmup must be >= 0 and --iters >= 1 (got {warmup}, {iters})")
    with open_runner(device, path) as runner:
        stats = runner.measure(warmup=warmup, iters=iters)
        shapes = {name: list(shape) for name, (shape, _) in runner.input_specs().items()}
    return {
        "model": str(path),
        "inputs": shapes,
        "latency_ms": stats.to_dict(),
        "cost": count_onnx(path).to_dict(),
        "size_bytes": path.stat().st_size,
        "device": device.to_dict(),
        "fingerprint": fingerprint(device),
    }
