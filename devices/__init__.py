"""Target devices as data: a `DeviceSpec` per device in one registry."""

from devices.catalog import DEVICES, get_device
from devices.fingerprint import fingerprint
from devices.spec import DeviceSpec

__all__ = ["DEVICES", "DeviceSpec", "fingerprint", "get_device"]
