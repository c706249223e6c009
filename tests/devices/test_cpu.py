"""The cpu device's channel multiple follows ONNX Runtime's NCHWc block on this CPU."""

import pytest

from devices.cpu import cpu_flags, nchwc_block

X86_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
X86_AVX512 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw\n\nprocessor\t: 1\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n"


def test_flags_are_read_from_cpuinfo_text():
    assert {"avx2", "fma"} <= cpu_flags(X86_AVX2)
    assert "asimd" in cpu_flags(ARM)
    assert cpu_flags("") == set()


def test_block_is_16_with_avx512f_else_8():
    assert nchwc_block(cpu_flags(X86_AVX512)) == 16
    assert nchwc_block(cpu_flags(X86_AVX2)) == 8
    assert nchwc_block(cpu_flags(ARM)) == 8
    assert nchwc_block(set()) == 8


@pytest.mark.host_cpu
def test_the_cpu_device_rounds_to_this_machines_block():
    from devices import DEVICES

    assert DEVICES.get("cpu").channel_multiple == nchwc_block()


def _cache(root, *entries):
    for i, (level, kind, size) in enumerate(entries):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    return root


def test_core_cache_is_the_level_2_data_or_unified_cache(tmp_path):
    from devices.cpu import core_cache_bytes

    intel = _cache(
        tmp_path / "a", (1, "Data", "48K"), (1, "Instruction", "64K"), (2, "Unified", "2048K")
    )
    assert core_cache_bytes(intel) == 2 << 20
    assert core_cache_bytes(_cache(tmp_path / "b", (2, "Data", "1M"))) == 1 << 20
    # no level 2, no sysfs, or a size it cannot read: unknown
    assert core_cache_bytes(_cache(tmp_path / "c", (1, "Data", "32K"))) is None
    assert core_cache_bytes(tmp_path / "missing") is None
    assert core_cache_bytes(_cache(tmp_path / "d", (2, "Unified", "lots"))) is None


def test_layer_cache_weights_only_for_the_onnxruntime_device_this_process_runs(monkeypatch):
    from dataclasses import replace

    import devices.cpu as cpu
    from devices import DEVICES

    monkeypatch.setattr(cpu, "core_cache_bytes", lambda: 2 << 20)
    local = DEVICES.get("cpu")
    assert cpu.layer_cache_weights(local) == (2 << 20) // 4  # fp32 weights
    assert cpu.layer_cache_weights(replace(local, url="http://10.0.0.2:8765")) is None
    assert cpu.layer_cache_weights(DEVICES.get("jetson-orin")) is None  # TensorRT
    monkeypatch.setattr(cpu, "core_cache_bytes", lambda: None)
    assert cpu.layer_cache_weights(local) is None
