"""How a device is reached: its agent's URL and token, from the command line, the
environment or the user's config file (in that order).

The config file (`$DEEPLSP_CONFIG`, else `$XDG_CONFIG_HOME/deeplsp/config.toml`,
else `~/.config/deeplsp/config.toml`) names agents per device:

    [devices.jetson-orin]
    url = "http://orin.local:8765"
    token_file = "~/.config/deeplsp/orin.token"

Tokens are never taken from the command line (they would show in `ps` and shell
history): `DEEPLSP_AGENT_TOKEN`, else the device's `token_file`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import urlsplit

from deeplsp.errors import DeepLSPError, first_line
from devices.catalog import get_device
from devices.nvidia import is_jetson as on_jetson
from devices.spec import DeviceSpec

try:
    import tomllib
except ImportError:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

ENV_URL = "DEEPLSP_DEVICE_URL"
ENV_TOKEN = "DEEPLSP_AGENT_TOKEN"
ENV_CONFIG = "DEEPLSP_CONFIG"

# What to install for a missing module a device needs, in one line.
INSTALL_HINTS = {
    "tensorrt": "pip install 'deeplsp[tensorrt]' (needs a CUDA GPU; on a Jetson: "
    "sudo apt install nvidia-jetpack)",
    "pycuda": "pip install 'deeplsp[tensorrt]'",
    "onnxruntime": "pip install onnxruntime",
}


def config_path() -> Path:
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "deeplsp" / "config.toml"


def load_config(path: Path | None = None) -> dict:
    """The user's config file as a dict ({} when there is none)."""
    path = path or config_path()
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DeepLSPError(f"config file {path} is not valid TOML: {first_line(exc)}") from exc


def _device_section(name: str, config: dict) -> dict:
    section = config.get("devices", {}).get(name, {})
    if not isinstance(section, dict):
        raise DeepLSPError(f"config file {config_path()}: [devices.{name}] must be a table")
    return section


def check_url(url: str) -> str:
    """An agent URL without its trailing slash, or a one-line error saying what is accepted."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DeepLSPError(
            f"device URL {url!r} is not an http(s) URL; expected e.g. http://orin.local:8765"
        )
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise DeepLSPError(f"device URL {url!r} has a bad port: {first_line(exc)}") from exc
    return url.rstrip("/")


def missing_requirements(device: DeviceSpec) -> list[str]:
    return [m for m in device.requires if find_spec(m) is None]


def resolve_device(name: str, url: str | None = None, config: dict | None = None) -> DeviceSpec:
    """The device `name`, reached through `url` (else $DEEPLSP_DEVICE_URL, else the
    config file) or locally; a clear error when neither can work."""
    device = get_device(name)
    config = load_config() if config is None else config
    url = url or os.environ.get(ENV_URL) or _device_section(name, config).get("url")
    if url:
        return replace(device, url=check_url(str(url)))
    if device.location == "agent" and not on_jetson():
        raise DeepLSPError(
            f"device {name!r} is reached through its agent: give --device-url "
            f"http://HOST:PORT, set {ENV_URL}, or add url to [devices.{name}] in "
            f"{config_path()} (start it on the device with `deeplsp agent serve`)"
        )
    missing = missing_requirements(device)
    if missing:
        raise DeepLSPError(
            f"device {name!r} needs {' and '.join(missing)} (not installed): "
            f"{INSTALL_HINTS.get(missing[0], 'pip install ' + missing[0])}"
        )
    return device


def agent_token(device_name: str, config: dict | None = None) -> str | None:
    """The token for the agent serving `device_name`: $DEEPLSP_AGENT_TOKEN, else the
    device's token_file in the config file; None when neither is set."""
    if os.environ.get(ENV_TOKEN):
        return os.environ[ENV_TOKEN].strip()
    config = load_config() if config is None else config
    token_file = _device_section(device_name, config).get("token_file")
    if not token_file:
        return None
    path = Path(str(token_file)).expanduser()
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise DeepLSPError(f"cannot read the agent token file {path}: {first_line(exc)}") from exc


def jetson_device_name(model: str) -> str | None:
    """Our device name for a Jetson board's device-tree model string, None if not an Orin."""
    m = model.lower()
    if "orin" not in m:
        return None
    if "nano" in m:
        return "jetson-orin-nano"
    if " nx" in m or "orin-nx" in m:
        return "jetson-orin-nx"
    return "jetson-orin"


def detect_local_device() -> str:
    """The device this machine is (what `deeplsp agent serve` serves by default): its
    Jetson Orin model, else `gpu` where TensorRT and a GPU are, else `cpu`."""
    from devices.nvidia import read_gpu, read_jetson_model

    model = read_jetson_model() if on_jetson() else None
    if model and jetson_device_name(model):
        return jetson_device_name(model)
    if not missing_requirements(get_device("gpu")) and read_gpu() is not None:
        return "gpu"
    return "cpu"
