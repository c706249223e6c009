"""Target devices as data: a `DeviceSpec` per device in one registry, and how each is
reached (locally, or through an agent at a URL)."""

from devices.catalog import DEVICES, get_device
from devices.config import resolve_device
from devices.fingerprint import fingerprint
from devices.spec import DeviceSpec

__all__ = ["DEVICES", "DeviceSpec", "fingerprint", "get_device", "resolve_device"]
