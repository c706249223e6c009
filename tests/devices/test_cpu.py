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
