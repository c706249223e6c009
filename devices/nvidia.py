"""What identifies an NVIDIA (TensorRT) device for a latency fingerprint.

Latency on a Jetson depends on far more than the GPU's name: the L4T/JetPack
release, the nvpmodel power mode and the clocks it pins all move it by tens of
percent. Each reader here returns None where the information cannot be read
(not a Jetson, no permission, binary missing) and never raises, so a
fingerprint can always be taken; each has a pure parser tested on sample text.
"""

from __future__ import annotations

import contextlib
import glob
import re
import subprocess
from importlib import metadata
from pathlib import Path

DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
EMC_RATE = Path("/sys/kernel/debug/bpmp/debug/clk/emc/rate")
GPU_FREQ_GLOBS = (
    "/sys/devices/platform/gpu.0/devfreq/*/cur_freq",  # JetPack 6 (Orin)
    "/sys/devices/gpu.0/devfreq/*/cur_freq",  # JetPack 4/5
    "/sys/devices/platform/bus@0/*.gpu/devfreq/*/cur_freq",  # Orin, JetPack 5
    "/sys/devices/platform/*.gpu/devfreq/*/cur_freq",  # Xavier
)
CPU_FREQ_GLOB = "/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"
TENSORRT_DISTS = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11")
COMMAND_TIMEOUT_S = 5.0


# -- helpers ---------------------------------------------------------------------
def _read_text(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except (OSError, ValueError):
        return None


def _run(cmd: list[str], timeout: float = COMMAND_TIMEOUT_S) -> str | None:
    """stdout of `cmd`, or None if it is missing, fails, or hangs."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def parse_int(text: str | None) -> int | None:
    """An integer from a sysfs file's text ("1300500000\\n"), or None."""
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


# -- Jetson identity -------------------------------------------------------------
def parse_device_tree_model(raw: bytes) -> str | None:
    """The board name in /proc/device-tree/model, which is NUL-terminated."""
    text = raw.split(b"\x00", 1)[0].decode(errors="replace").strip()
    return text or None


def read_jetson_model(path: Path | None = None) -> str | None:
    try:
        return parse_device_tree_model((path or DEVICE_TREE_MODEL).read_bytes())
    except OSError:
        return None


_L4T_RE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")


def parse_l4t_release(text: str) -> str | None:
    """ "# R36 (release), REVISION: 3.0, ..." -> "36.3.0"."""
    m = _L4T_RE.search(text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def read_l4t_release(path: Path | None = None) -> str | None:
    text = _read_text(path or NV_TEGRA_RELEASE)
    return parse_l4t_release(text) if text is not None else None


def parse_jetpack_version(text: str) -> str | None:
    """dpkg's version of nvidia-jetpack ("6.0+b106", "5.1.2-b104") -> "6.0", "5.1.2"."""
    m = re.match(r"\s*(?:\d+:)?(\d+(?:\.\d+)*)", text)
    return m.group(1) if m else None


def read_jetpack_version() -> str | None:
    out = _run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"])
    return parse_jetpack_version(out) if out else None


def parse_nvpmodel(text: str) -> dict | None:
    """`nvpmodel -q` output ("NV Power Mode: MAXN\\n0") -> {"name": "MAXN", "id": 0}.

    Warning lines ("NVPM WARN: ...") may come first; the id is the first integer line after
    the mode's name, and is None when absent.
    """
    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        m = re.match(r"NV Power Mode\s*:\s*(.+)", line)
        if m:
            mode_id = next((int(x) for x in lines[i + 1 :] if re.fullmatch(r"\d+", x)), None)
            return {"name": m.group(1).strip(), "id": mode_id}
    return None


def read_power_mode() -> dict | None:
    out = _run(["nvpmodel", "-q"])
    return parse_nvpmodel(out) if out else None


def is_jetson() -> bool:
    """Whether this is a Jetson (L4T writes /etc/nv_tegra_release)."""
    return NV_TEGRA_RELEASE.exists()


# -- clocks ----------------------------------------------------------------------
def _first_readable_int(patterns: tuple[str, ...]) -> int | None:
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            value = parse_int(_read_text(path))
            if value is not None:
                return value
    return None


def read_gpu_clock_hz(patterns: tuple[str, ...] | None = None) -> int | None:
    """Current GPU clock from devfreq (Hz), where a Jetson exposes it."""
    return _first_readable_int(patterns or GPU_FREQ_GLOBS)


def read_emc_clock_hz(path: Path | None = None) -> int | None:
    """Memory (EMC) clock in Hz; debugfs, so usually readable by root only."""
    return parse_int(_read_text(path or EMC_RATE))


def _cpu_index(path: str) -> int:
    m = re.search(r"/cpu(\d+)/", path)
    return int(m.group(1)) if m else -1


def read_cpu_clocks_hz(pattern: str | None = None) -> list[int] | None:
    """Each online CPU's current clock in Hz (sysfs gives kHz), in CPU order."""
    values = []
    for path in sorted(glob.glob(pattern or CPU_FREQ_GLOB), key=_cpu_index):
        khz = parse_int(_read_text(path))
        if khz is not None:
            values.append(khz * 1000)
    return values or None


def read_clocks() -> dict:
    return {
        "gpu_hz": read_gpu_clock_hz(),
        "emc_hz": read_emc_clock_hz(),
        "cpu_hz": read_cpu_clocks_hz(),
    }


# -- GPU and TensorRT ------------------------------------------------------------
def _na(value: str) -> str | None:
    value = value.strip()
    return None if not value or value.startswith("[N/A") or value == "N/A" else value


def parse_nvidia_smi(text: str) -> list[dict]:
    """Rows of `nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader`."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]  # a GPU name may hold a comma
        if len(parts) != 3 or not parts[0]:
            continue
        gpus.append(
            {
                "name": _na(parts[0]),
                "compute_capability": _na(parts[1]),
                "driver": _na(parts[2]),
                "cuda_driver": None,
                "source": "nvidia-smi",
            }
        )
    return gpus


def format_cuda_version(version: int) -> str:
    """CUDA's integer version (12040) -> "12.4"."""
    return f"{version // 1000}.{(version % 1000) // 10}"


def _gpu_from_nvidia_smi(index: int) -> dict | None:
    cmd = ["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"]
    out = _run(cmd)
    gpus = parse_nvidia_smi(out) if out else []
    return gpus[index] if index < len(gpus) else None


def _gpu_from_pycuda(index: int) -> dict | None:
    try:
        import pycuda.driver as cuda

        cuda.init()
        dev = cuda.Device(index)
        major, minor = dev.compute_capability()
        return {
            "name": dev.name(),
            "compute_capability": f"{major}.{minor}",
            "driver": None,
            "cuda_driver": format_cuda_version(cuda.get_driver_version()),
            "source": "pycuda",
        }
    except Exception:  # not installed, no driver, no such device: all mean "unknown"
        return None


def read_gpu(index: int = 0) -> dict | None:
    """Name, compute capability and driver of GPU `index`: nvidia-smi, else pycuda."""
    return _gpu_from_nvidia_smi(index) or _gpu_from_pycuda(index)


def read_tensorrt_version() -> str | None:
    """Installed TensorRT version, from package metadata or (JetPack's apt package) the module."""
    for dist in TENSORRT_DISTS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:  # ImportError, or a broken install failing to load its libraries
        return None


def nvidia_info() -> dict:
    """Everything above in one dict; None (or an empty reading) wherever it is unknown."""
    jetson = is_jetson()
    return {
        "jetson": jetson,
        "model": read_jetson_model() if jetson else None,
        "l4t": read_l4t_release() if jetson else None,
        "jetpack": read_jetpack_version() if jetson else None,
        "power_mode": read_power_mode() if jetson else None,
        "clocks": read_clocks(),
        "gpu": read_gpu(),
        "tensorrt": read_tensorrt_version(),
    }
