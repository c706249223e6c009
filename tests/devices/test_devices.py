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
