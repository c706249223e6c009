"""What this machine's CPU asks of a pruned network's shape.

ONNX Runtime's CPU convolutions run in MLAS's blocked NCHWc layout when a layer's
channel counts are multiples of the block: 16 floats with AVX-512F, 8 otherwise
(onnxruntime/core/mlas/lib/platform.cpp, `NchwcBlockSize`). Other counts fall back
to plain NCHW convolutions with layout reorders around them. Measured here (AVX2,
MobileNetV3-Large at 1x32x32): every group at 70% of its channels ran at 1.21x the
dense model's latency with counts as they fell, 0.65x with counts rounded to 8.
"""

from __future__ import annotations

from pathlib import Path

from devices.spec import DeviceSpec


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (empty off Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def nchwc_block(flags: set[str] | None = None) -> int:
    """The channel multiple that keeps ONNX Runtime's CPU convolutions blocked."""
    flags = cpu_flags() if flags is None else flags
    return 16 if "avx512f" in flags else 8


def core_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """The first core's level-2 data (or unified) cache in bytes; None where Linux's sysfs
    does not say. A layer timed alone, run after run, keeps weights that fit here hot;
    inside a network the other layers evict them (see `LatencyModel.chargeable`)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        for index in sorted(root.glob("index*")):
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
            if level == "2" and kind in ("Data", "Unified"):
                return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    except (OSError, ValueError):
        return None
    return None


def layer_cache_weights(device: DeviceSpec) -> int | None:
    """The fp32 weights that fit the core cache of the ONNX Runtime device this process
    runs (`core_cache_bytes`); None for a device measured elsewhere (an agent) or another
    runtime, where it is not known."""
    if device.backend != "onnxruntime" or device.url is not None:
        return None
    size = core_cache_bytes()
    return size // 4 if size else None
