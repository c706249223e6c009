"""The one capability check: tests marked gpu/trt/jetson skip, with a reason, where
the hardware or library is missing."""

from __future__ import annotations

import gzip
import os
import struct
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

pytest_plugins = ["pytester"]


def _capabilities() -> dict[str, str | None]:
    """marker -> None when available, else the reason to skip."""
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    has_trt = find_spec("tensorrt") is not None and find_spec("pycuda") is not None
    jetson = Path("/etc/nv_tegra_release").exists() or bool(os.environ.get("DEEPLSP_DEVICE_URL"))
    return {
        "gpu": None if gpu else "no CUDA GPU visible to torch",
        "trt": None
        if has_trt
        else "tensorrt and pycuda are not installed (pip install '.[tensorrt]')",
        "jetson": None if jetson else "not on a Jetson and DEEPLSP_DEVICE_URL is not set",
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    caps = _capabilities()
    for item in items:
        for marker, reason in caps.items():
            if reason is not None and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def cpu_channel_multiple_8(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """The cpu device's channel multiple is this host's ONNX Runtime block: 16 with
    AVX-512, 8 otherwise. With 16, a tiny test model's 16-channel group cannot be pruned
    at all and a 32-channel one only to half, so tests that count channels would pass on
    one host and fail on the next. Every test sees 8, except those marked `host_cpu`."""
    if request.node.get_closest_marker("host_cpu"):
        return
    from dataclasses import replace

    from devices import DEVICES

    monkeypatch.setitem(DEVICES._entries, "cpu", replace(DEVICES.get("cpu"), channel_multiple=8))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write `array` (uint8) in the IDX format of (Fashion-)MNIST, gzipped."""
    magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashionmnist_dir(tmp_path: Path) -> Path:
    """A tiny Fashion-MNIST in the real IDX .gz format: 64 train and 32 test images.

    Each class gets a distinct bright square, so a model can learn it in a few steps.
    """
    rng = np.random.default_rng(0)
    root = tmp_path / "fashionmnist"
    root.mkdir()
    for prefix, n in (("train", 64), ("t10k", 32)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, size=(n, 28, 28))
        for i, y in enumerate(labels):
            r, c = divmod(int(y), 5)
            images[i, 2 + r * 12 : 12 + r * 12, 2 + c * 5 : 6 + c * 5] = 255
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root
