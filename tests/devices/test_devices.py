import pytest

from deeplsp.errors import UnknownNameError
from devices import DEVICES, fingerprint, get_device


def test_cpu_device_is_onnxruntime_fp32_batch1():
    cpu = get_device("cpu")
    assert (cpu.backend, cpu.precision, cpu.batch) == ("onnxruntime", "fp32", 1)
    assert cpu.resolved_threads() >= 1
    assert cpu.to_dict()["requires"] == ["onnxruntime"]


def test_unknown_device_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="choose from: .*cpu"):
        get_device("tpu")


def test_fingerprint_records_hardware_and_runtime_and_is_stable():
    cpu = get_device("cpu")
    a, b = fingerprint(cpu), fingerprint(cpu)
    assert a == b
    assert a["runtime"]["onnxruntime"]  # a version string, not None
    assert a["cores"] == cpu.resolved_threads()
    assert len(a["id"]) == 16 and a["cpu"]


def test_fingerprint_id_changes_with_settings():
    from dataclasses import replace

    cpu = get_device("cpu")
    assert fingerprint(cpu)["id"] != fingerprint(replace(cpu, threads=97))["id"]
    assert list(DEVICES)[0].name == "cpu"


def test_tensorrt_fingerprint_has_the_gpu_stack_and_ignores_clocks_in_its_id(monkeypatch):
    import devices.nvidia as nv

    reading = {
        "jetson": True,
        "model": "NVIDIA Jetson AGX Orin Developer Kit",
        "l4t": "36.3.0",
        "jetpack": "6.0",
        "power_mode": {"name": "MAXN", "id": 0},
        "clocks": {"gpu_hz": 1_300_000_000},
        "gpu": {"name": "Orin", "compute_capability": "8.7"},
        "tensorrt": "10.3.0",
    }
    monkeypatch.setattr(nv, "nvidia_info", lambda: dict(reading))
    orin = get_device("jetson-orin")
    a = fingerprint(orin)
    assert a["runtime"]["tensorrt"] == "10.3.0" and a["power_mode"]["name"] == "MAXN"
    assert a["model"].startswith("NVIDIA Jetson AGX Orin") and a["clocks"]["gpu_hz"]
    reading["clocks"] = {"gpu_hz": 600_000_000}  # clocks move between readings
    assert fingerprint(orin)["id"] == a["id"]
    reading["power_mode"] = {"name": "15W", "id": 1}  # a power mode changes latency
    assert fingerprint(orin)["id"] != a["id"]
    assert [d.name for d in DEVICES][1:] == [
        "jetson-orin",
        "jetson-orin-nx",
        "jetson-orin-nano",
        "gpu",
    ]
