"""NVIDIA/Jetson device info: parsers on real-looking output, readers that return None
(never raise) where a file or binary is missing, and the combined dict."""

from __future__ import annotations

import os
import stat
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest

import devices.nvidia as nv

ORIN_RELEASE = (
    "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, "
    "DATE: Mon May  6 17:34:21 UTC 2024\n"
    "# KERNEL_VARIANT: oot\n"
    "TARGET_USERSPACE_LIB_DIR=nvidia\n"
)
XAVIER_RELEASE = (
    "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
    "DATE: Tue Aug  1 19:57:35 UTC 2023\n"
)
NVPMODEL_Q = (
    "NVPM WARN: Golden image context is already created\n"
    "NVPM WARN: Reading /var/lib/nvpmodel/status: ok\n"
    "NV Power Mode: MODE_30W\n"
    "2\n"
)
SMI = "NVIDIA H100 80GB HBM3, 9.0, 550.54.15\nNVIDIA A100-SXM4-40GB, 8.0, 550.54.15\n"


def fake_binary(directory: Path, name: str, stdout: str = "", code: int = 0) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\nprintf '%s' '{stdout}'\nexit {code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def bin_dir(tmp_path, monkeypatch):
    """A PATH holding only the fake binaries a test writes (and sh's own directory)."""
    d = tmp_path / "bin"
    d.mkdir()
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}/bin{os.pathsep}/usr/bin")
    for real in ("nvidia-smi", "nvpmodel", "dpkg-query"):  # shadow any real one
        fake_binary(d, real, code=127)
    return d


# -- parsers ---------------------------------------------------------------------------
def test_parse_device_tree_model():
    raw = b"NVIDIA Jetson AGX Orin Developer Kit\x00"
    assert nv.parse_device_tree_model(raw) == "NVIDIA Jetson AGX Orin Developer Kit"
    assert nv.parse_device_tree_model(b"Jetson Nano\x00junk\x00") == "Jetson Nano"
    assert nv.parse_device_tree_model(b"\x00") is None


def test_parse_l4t_release():
    assert nv.parse_l4t_release(ORIN_RELEASE) == "36.3.0"
    assert nv.parse_l4t_release(XAVIER_RELEASE) == "35.4.1"
    assert nv.parse_l4t_release("Ubuntu 22.04") is None


def test_parse_jetpack_version():
    assert nv.parse_jetpack_version("6.0+b106") == "6.0"
    assert nv.parse_jetpack_version("5.1.2-b104") == "5.1.2"
    assert nv.parse_jetpack_version("1:6.1+b123") == "6.1"
    assert nv.parse_jetpack_version("") is None


def test_parse_nvpmodel():
    assert nv.parse_nvpmodel("NV Power Mode: MAXN\n0\n") == {"name": "MAXN", "id": 0}
    assert nv.parse_nvpmodel(NVPMODEL_Q) == {"name": "MODE_30W", "id": 2}
    assert nv.parse_nvpmodel("NV Power Mode: 15W") == {"name": "15W", "id": None}
    assert nv.parse_nvpmodel("nvpmodel: command failed") is None


def test_parse_nvidia_smi_and_cuda_versions():
    h100, a100 = nv.parse_nvidia_smi(SMI)
    assert h100 == {
        "name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "driver": "550.54.15",
        "cuda_driver": None,
        "source": "nvidia-smi",
    }
    assert a100["compute_capability"] == "8.0"
    (orin,) = nv.parse_nvidia_smi("Orin (nvgpu), [N/A], 540.3.0\n\n")
    assert orin["name"] == "Orin (nvgpu)" and orin["compute_capability"] is None
    assert nv.parse_nvidia_smi("No devices were found\n") == []
    assert nv.format_cuda_version(12040) == "12.4" and nv.format_cuda_version(11080) == "11.8"
    assert nv.parse_int("1300500000\n") == 1300500000
    assert nv.parse_int("n/a") is None and nv.parse_int(None) is None


# -- readers: files ------------------------------------------------------------------
def test_file_readers(tmp_path):
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    release = tmp_path / "nv_tegra_release"
    release.write_text(ORIN_RELEASE)
    emc = tmp_path / "emc_rate"
    emc.write_text("3199000000\n")
    assert nv.read_jetson_model(model) == "NVIDIA Jetson Orin Nano Developer Kit"
    assert nv.read_l4t_release(release) == "36.3.0"
    assert nv.read_emc_clock_hz(emc) == 3199000000
    missing = tmp_path / "missing"
    assert nv.read_jetson_model(missing) is None
    assert nv.read_l4t_release(missing) is None
    assert nv.read_emc_clock_hz(missing) is None
    assert nv.read_emc_clock_hz(tmp_path) is None  # a directory: unreadable, not an error


def test_clock_readers_from_a_fake_sysfs(tmp_path):
    gpu = tmp_path / "gpu.0/devfreq/17000000.gpu"
    gpu.mkdir(parents=True)
    (gpu / "cur_freq").write_text("918000000\n")
    for cpu, khz in ((0, 1728000), (2, 729600), (10, 2201600)):
        d = tmp_path / f"cpu{cpu}/cpufreq"
        d.mkdir(parents=True)
        (d / "scaling_cur_freq").write_text(f"{khz}\n")
    cpu_glob = str(tmp_path / "cpu[0-9]*/cpufreq/scaling_cur_freq")
    gpu_glob = str(tmp_path / "gpu.0/devfreq/*/cur_freq")
    assert nv.read_gpu_clock_hz((str(tmp_path / "nope/*"), gpu_glob)) == 918000000
    assert nv.read_cpu_clocks_hz(cpu_glob) == [1728000000, 729600000, 2201600000]  # cpu 0, 2, 10
    assert nv.read_gpu_clock_hz((str(tmp_path / "nope/*"),)) is None
    assert nv.read_cpu_clocks_hz(str(tmp_path / "nope/*")) is None
    assert set(nv.read_clocks()) == {"gpu_hz", "emc_hz", "cpu_hz"}


# -- readers: binaries ------------------------------------------------------------------
def test_command_readers_parse_real_binaries_output(bin_dir):
    fake_binary(bin_dir, "nvpmodel", NVPMODEL_Q)
    fake_binary(bin_dir, "dpkg-query", "6.0+b106")
    fake_binary(bin_dir, "nvidia-smi", SMI)
    assert nv.read_power_mode() == {"name": "MODE_30W", "id": 2}
    assert nv.read_jetpack_version() == "6.0"
    assert nv.read_gpu()["name"] == "NVIDIA H100 80GB HBM3"
    assert nv.read_gpu(1)["name"] == "NVIDIA A100-SXM4-40GB"


def test_command_readers_return_none_when_binaries_fail_or_are_missing(bin_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycuda", None)  # no pycuda fallback either
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    assert nv.read_power_mode() is None  # exit 127
    assert nv.read_jetpack_version() is None
    assert nv.read_gpu() is None
    for name in ("nvpmodel", "dpkg-query", "nvidia-smi"):
        (bin_dir / name).unlink()
    assert nv.read_power_mode() is None  # not on PATH at all
    assert nv.read_jetpack_version() is None
    assert nv.read_gpu() is None
    assert nv._run(["definitely-not-a-binary-deeplsp"]) is None


def test_run_times_out(bin_dir):
    slow = bin_dir / "slow"
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(0o755)
    assert nv._run([str(slow)], timeout=0.2) is None


def test_gpu_from_pycuda_when_nvidia_smi_is_missing(bin_dir, monkeypatch):
    class Device:
        def __init__(self, index):
            assert index == 0

        def name(self):
            return "Orin"

        def compute_capability(self):
            return (8, 7)

    driver = types.ModuleType("pycuda.driver")
    driver.init = lambda: None
    driver.Device = Device
    driver.get_driver_version = lambda: 12020
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = driver
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    assert nv.read_gpu() == {
        "name": "Orin",
        "compute_capability": "8.7",
        "driver": None,
        "cuda_driver": "12.2",
        "source": "pycuda",
    }


def test_tensorrt_version(monkeypatch):
    def no_dist(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(nv.metadata, "version", no_dist)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert nv.read_tensorrt_version() is None
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.3.0"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)  # JetPack's apt package: no dist-info
    assert nv.read_tensorrt_version() == "10.3.0"
    monkeypatch.setattr(
        nv.metadata, "version", lambda n: "10.7.0" if n == "tensorrt-cu12" else no_dist(n)
    )
    assert nv.read_tensorrt_version() == "10.7.0"


# -- combined ---------------------------------------------------------------------------
def test_nvidia_info_on_a_fake_jetson_and_off_one(tmp_path, bin_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    monkeypatch.setattr(nv, "read_tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(nv, "NV_TEGRA_RELEASE", tmp_path / "nv_tegra_release")
    monkeypatch.setattr(nv, "DEVICE_TREE_MODEL", tmp_path / "model")
    keys = {"jetson", "model", "l4t", "jetpack", "power_mode", "clocks", "gpu", "tensorrt"}

    off = nv.nvidia_info()
    assert set(off) == keys and not nv.is_jetson()
    assert off["jetson"] is False and off["model"] is off["l4t"] is off["gpu"] is None

    (tmp_path / "nv_tegra_release").write_text(ORIN_RELEASE)
    (tmp_path / "model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    fake_binary(bin_dir, "nvpmodel", "NV Power Mode: MAXN\n0\n")
    fake_binary(bin_dir, "dpkg-query", "6.0+b106")
    on = nv.nvidia_info()
    assert nv.is_jetson() and on["jetson"] is True
    assert on["model"] == "NVIDIA Jetson AGX Orin Developer Kit"
    assert (on["l4t"], on["jetpack"], on["tensorrt"]) == ("36.3.0", "6.0", "10.3.0")
    assert on["power_mode"] == {"name": "MAXN", "id": 0}
