"""The devices DeepLSP knows by name."""

from __future__ import annotations

from deeplsp.registry import Registry
from devices.spec import DeviceSpec

DEVICES: Registry[DeviceSpec] = Registry("device")

DEVICES.register(
    DeviceSpec(
        name="cpu",
        description="this machine's CPU through ONNX Runtime (fp32, batch 1, all usable cores)",
        backend="onnxruntime",
        precision="fp32",
        batch=1,
        threads=None,
        channel_multiple=1,
        requires=("onnxruntime",),
    )
)


def get_device(name: str) -> DeviceSpec:
    return DEVICES.get(name)
