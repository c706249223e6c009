"""Identify the hardware and runtime a latency was measured on.

Latencies are only comparable on the same fingerprint, so it is recorded with
every measurement and keys the latency caches.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from devices.spec import DeviceSpec


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def fingerprint(device: DeviceSpec) -> dict:
    """Hardware and runtime versions of a local device, plus a short stable id.

    TensorRT devices add the GPU, TensorRT, JetPack and the power mode (all change
    latency, so they key the caches); clocks are recorded too but left out of the id,
    since they move from one reading to the next."""
    info: dict = {
        "device": device.name,
        "backend": device.backend,
        "precision": device.precision,
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "cores": device.resolved_threads(),
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "runtime": {name: _version(name) for name in device.requires},
    }
    clocks = None
    if device.backend == "tensorrt":
        from devices.nvidia import nvidia_info

        nv = nvidia_info()
        clocks = nv.pop("clocks")
        info["runtime"]["tensorrt"] = nv.pop("tensorrt")
        info.update(nv)
    info["id"] = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
    if clocks is not None:
        info["clocks"] = clocks
    return info
