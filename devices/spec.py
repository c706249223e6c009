"""What a target device is, as plain data: no class per device."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    description: str
    backend: str  # runtime that measures latency: "onnxruntime" or "tensorrt"
    precision: str = "fp32"
    batch: int = 1
    threads: int | None = None  # None: every core this process may use
    channel_multiple: int = 1  # pruned channel counts are rounded to this
    # "local": measured in this process's machine; "agent": usually reached through an
    # agent at a URL (a Jetson seen from the workstation), local when run on the device.
    location: str = "local"
    requires: tuple[str, ...] = field(default_factory=tuple)
    url: str | None = None  # set by devices.config.resolve_device: measure through this agent

    def resolved_threads(self) -> int:
        if self.threads is not None:
            return self.threads
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["requires"] = list(self.requires)
        return d
