import os

import pytest

from deeplsp.errors import DeepLSPError
from devices import config as cfgmod
from devices.config import agent_token, check_url, load_config, resolve_device


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for var in (cfgmod.ENV_URL, cfgmod.ENV_TOKEN):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(cfgmod.ENV_CONFIG, str(tmp_path / "config.toml"))
    monkeypatch.setattr(cfgmod, "on_jetson", lambda: False)


def _write_config(tmp_path, text):
    (tmp_path / "config.toml").write_text(text)


def test_cpu_is_local_without_a_url():
    assert resolve_device("cpu").url is None


def test_url_precedence_flag_then_env_then_config(monkeypatch, tmp_path):
    _write_config(tmp_path, '[devices.jetson-orin]\nurl = "http://from-config:1"\n')
    assert resolve_device("jetson-orin").url == "http://from-config:1"
    monkeypatch.setenv(cfgmod.ENV_URL, "http://from-env:2/")
    assert resolve_device("jetson-orin").url == "http://from-env:2"
    assert resolve_device("jetson-orin", "https://flag:3").url == "https://flag:3"


def test_agent_device_without_url_says_how_to_give_one():
    with pytest.raises(DeepLSPError, match="--device-url.*DEEPLSP_DEVICE_URL.*agent serve"):
        resolve_device("jetson-orin-nano")


def test_agent_device_is_local_on_the_jetson_itself(monkeypatch):
    monkeypatch.setattr(cfgmod, "on_jetson", lambda: True)
    monkeypatch.setattr(cfgmod, "missing_requirements", lambda d: [])
    device = resolve_device("jetson-orin")
    assert device.url is None and device.backend == "tensorrt"


def test_local_tensorrt_device_without_tensorrt_says_what_to_install(monkeypatch):
    monkeypatch.setattr(cfgmod, "missing_requirements", lambda d: ["tensorrt", "pycuda"])
    with pytest.raises(
        DeepLSPError, match=r"needs tensorrt and pycuda.*pip install 'deeplsp\[tensorrt\]'"
    ):
        resolve_device("gpu")


@pytest.mark.parametrize("url", ["orin.local:8765", "ftp://x", "http://", "http://h:99999"])
def test_bad_urls_are_one_line_errors(url):
    with pytest.raises(DeepLSPError, match="URL"):
        check_url(url)


def test_bad_config_file_names_the_file(tmp_path):
    _write_config(tmp_path, "[devices\n")
    with pytest.raises(DeepLSPError, match="config.toml is not valid TOML"):
        load_config()


def test_token_from_env_then_token_file(monkeypatch, tmp_path):
    token = tmp_path / "orin.token"
    token.write_text("s3cret-token-from-file\n")
    os.chmod(token, 0o600)
    _write_config(tmp_path, f'[devices.jetson-orin]\ntoken_file = "{token}"\n')
    assert agent_token("jetson-orin") == "s3cret-token-from-file"
    assert agent_token("cpu") is None
    monkeypatch.setenv(cfgmod.ENV_TOKEN, "from-env")
    assert agent_token("jetson-orin") == "from-env"


def test_unreadable_token_file_is_a_clear_error(tmp_path):
    _write_config(tmp_path, f'[devices.cpu]\ntoken_file = "{tmp_path / "missing"}"\n')
    with pytest.raises(DeepLSPError, match="cannot read the agent token file"):
        agent_token("cpu")


@pytest.mark.parametrize(
    "model, name",
    [
        ("NVIDIA Jetson AGX Orin Developer Kit", "jetson-orin"),
        ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "jetson-orin-nx"),
        ("NVIDIA Jetson Orin Nano Developer Kit", "jetson-orin-nano"),
        ("NVIDIA Jetson Xavier NX Developer Kit", None),
    ],
)
def test_jetson_board_names_map_to_devices(model, name):
    assert cfgmod.jetson_device_name(model) == name


def test_detect_local_device_here_is_cpu_without_tensorrt(monkeypatch):
    import devices.nvidia as nv

    monkeypatch.setattr(cfgmod, "missing_requirements", lambda d: ["tensorrt"])
    assert cfgmod.detect_local_device() == "cpu"
    monkeypatch.setattr(cfgmod, "on_jetson", lambda: True)
    monkeypatch.setattr(nv, "read_jetson_model", lambda: "NVIDIA Jetson Orin Nano Developer Kit")
    assert cfgmod.detect_local_device() == "jetson-orin-nano"
