"""Measure a model file on a device: latency, cost and the device fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

from deeplsp.errors import DeepLSPError
from devices import DeviceSpec
from profiling import target
from profiling.counting import count_onnx
from profiling.onnx_inputs import onnx_input_specs


def profile_onnx(path: str | Path, device: DeviceSpec, warmup: int = 20, iters: int = 100) -> dict:
    """Profile an ONNX file, or on a TensorRT device also a built engine (`.engine`, whose
    metadata JSON beside it gives the inputs)."""
    path = Path(path)
    if not path.is_file():
        raise DeepLSPError(f"model file {path} does not exist")
    if warmup < 0 or iters < 1:
        raise DeepLSPError(f"--warmup must be >= 0 and --iters >= 1 (got {warmup}, {iters})")
    if path.suffix in (".engine", ".plan", ".trt"):
        stats = target.measure_engine(device, path, warmup, iters, repeats=1)
        meta = Path(f"{path}.json")
        info = json.loads(meta.read_text()) if meta.is_file() else {}
        shapes = {i["name"]: i["shape"] for i in info.get("inputs", [])}
        cost = None
    else:
        stats = target.measure(device, path, warmup, iters, repeats=1)
        shapes = {k: list(shape) for k, (shape, _) in onnx_input_specs(path).items()}
        cost = count_onnx(path).to_dict()
    return {
        "model": str(path),
        "inputs": shapes,
        "latency_ms": stats.to_dict(),
        "cost": cost,
        "size_bytes": path.stat().st_size,
        "device": device.to_dict(),
        "fingerprint": target.fingerprint(device),
    }
