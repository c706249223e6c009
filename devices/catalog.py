"""The devices DeepLSP knows by name."""

from __future__ import annotations

from deeplsp.registry import Registry
from devices.cpu import nchwc_block
from devices.spec import DeviceSpec

DEVICES: Registry[DeviceSpec] = Registry("device")

_TRT = ("tensorrt", "pycuda")

DEVICES.register(
    DeviceSpec(
        name="cpu",
        description="this machine's CPU through ONNX Runtime (fp32, batch 1, all usable cores)",
        backend="onnxruntime",
        precision="fp32",
        batch=1,
        threads=None,
        channel_multiple=nchwc_block(),  # see devices/cpu.py
        requires=("onnxruntime",),
    )
)
# fp16 tensor cores on Ampere (every Orin) want channel counts in multiples of 8;
# other counts are padded by TensorRT, so pruning between multiples buys nothing.
for _name, _what in (
    ("jetson-orin", "Jetson AGX Orin"),
    ("jetson-orin-nx", "Jetson Orin NX"),
    ("jetson-orin-nano", "Jetson Orin Nano"),
):
    DEVICES.register(
        DeviceSpec(
            name=_name,
            description=f"{_what} GPU through TensorRT (fp16, batch 1), via its agent",
            backend="tensorrt",
            precision="fp16",
            batch=1,
            threads=1,
            channel_multiple=8,
            location="agent",
            requires=_TRT,
        )
    )
DEVICES.register(
    DeviceSpec(
        name="gpu",
        description="this machine's CUDA GPU through TensorRT (fp16, batch 1)",
        backend="tensorrt",
        precision="fp16",
        batch=1,
        threads=1,
        channel_multiple=8,
        requires=_TRT,
    )
)


def get_device(name: str) -> DeviceSpec:
    return DEVICES.get(name)
