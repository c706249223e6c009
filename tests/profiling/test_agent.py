"""The device agent, served for real by uvicorn on 127.0.0.1 for the `cpu` device and
spoken to over HTTP (raw requests and raw sockets here; the client in test_remote.py)."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import uvicorn
from onnx import TensorProto, helper, numpy_helper

from deeplsp.errors import DeepLSPError
from devices import get_device
from profiling import target
from profiling.agent import _is_loopback, create_app, generate_token, load_agent_token, serve
from profiling.runner import LatencyStats

# The agent serves from another process, where the cpu device keeps this host's channel
# multiple: so do these tests.
pytestmark = pytest.mark.host_cpu

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# -- helpers shared with test_remote.py -------------------------------------------------
def conv_onnx(path: Path) -> Path:
    """conv(3->16) -> relu -> conv(16->16), 32x32: big enough (about 0.1-1 ms) that timing
    it is not all call overhead, small enough to keep the tests quick."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32), "w2")
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 16, 32, 32])
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["logits"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


class AgentServer:
    """The agent app served by uvicorn in a background thread on a free local port."""

    def __init__(self, **limits: object) -> None:
        app = create_app(get_device("cpu"), TOKEN, **limits)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "agent did not start"
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def info(self) -> dict:
        return httpx.get(f"{self.url}/v1/info", headers=AUTH, timeout=10).json()

    def wait_queue(self, **want: int) -> None:
        """Wait until the agent's queue state has the `want` values."""
        deadline = time.monotonic() + 10
        while True:
            queue = self.info()["queue"]
            if all(queue[k] == v for k, v in want.items()):
                return
            assert time.monotonic() < deadline, f"queue stayed {queue}, wanted {want}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentServer]:
    server = AgentServer()
    yield server
    server.close()


@pytest.fixture
def start_agent() -> Iterator[Callable[..., AgentServer]]:
    """Start agents with other limits; each is stopped after the test."""
    servers: list[AgentServer] = []

    def start(**limits: object) -> AgentServer:
        servers.append(AgentServer(**limits))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return conv_onnx(tmp_path / "m.onnx")


@pytest.fixture
def blocked_measure(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """target.measure that holds the device until the returned event is set."""
    release = threading.Event()

    def measure(device, path, warmup, iters, repeats=3):
        assert release.wait(20), "test never released the measurement"
        return LatencyStats.from_samples([1.0, 2.0], warmup)

    monkeypatch.setattr(target, "measure", measure)
    yield release
    release.set()  # never leave an agent thread blocked at teardown


def post_model(url: str, path: Path, timeout: float = 30, **params: object) -> httpx.Response:
    params = {"warmup": 1, "iters": 3, "repeats": 1, **params}
    return httpx.post(
        f"{url}/v1/profile", params=params, content=path.read_bytes(), headers=AUTH, timeout=timeout
    )


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def raw_upload_headers(port: int, content_length: int) -> bytes:
    return (
        f"POST /v1/profile?warmup=1&iters=2 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {content_length}\r\n\r\n"
    ).encode()


# -- tests ------------------------------------------------------------------------------
def test_info_describes_the_device_and_its_fingerprint(agent):
    info = agent.info()
    cpu = get_device("cpu")
    assert info["api"] == 2 and info["agent"] == "deeplsp"
    assert info["device"] == cpu.to_dict()
    assert info["fingerprint"]["id"] == target.fingerprint(cpu)["id"]
    assert info["queue"] == {"running": 0, "waiting": 0, "max": 8}
    assert info["limits"]["max_upload_bytes"] == 512 * 2**20


@pytest.mark.parametrize(
    "headers, why",
    [
        ({}, "missing token"),
        ({"Authorization": "Bearer wrong-token-0123456789"}, "invalid token"),
        ({"Authorization": f"Basic {TOKEN}"}, "invalid token"),
    ],
)
def test_every_endpoint_needs_the_token(agent, model, headers, why):
    for method, path in (("GET", "/v1/info"), ("POST", "/v1/profile"), ("POST", "/v1/engine")):
        resp = httpx.request(method, agent.url + path, headers=headers, content=b"x")
        assert resp.status_code == 401, path
        assert why in resp.json()["error"]
        assert resp.headers["www-authenticate"] == "Bearer"


def test_bad_parameters_are_a_one_line_422(agent, model):
    for params, word in (
        ({"iters": 0}, "iters=0"),
        ({"kind": "pt"}, "kind=pt"),
        ({"repeats": 10**6}, "repeats"),
    ):
        resp = post_model(agent.url, model, **params)
        assert resp.status_code == 422
        error = resp.json()["error"]
        assert word in error and "\n" not in error
    assert httpx.get(f"{agent.url}/v2/nothing", headers=AUTH).status_code == 404


def test_empty_upload_is_refused(agent):
    resp = httpx.post(f"{agent.url}/v1/profile", headers=AUTH, content=b"")
    assert resp.status_code == 400 and "empty upload" in resp.json()["error"]


def test_uploads_over_the_limit_get_413_declared_or_chunked(start_agent, model):
    small = start_agent(max_upload_bytes=1024)
    assert model.stat().st_size > 1024
    resp = post_model(small.url, model)
    assert resp.status_code == 413
    assert resp.json() == {
        "error": f"upload of {model.stat().st_size} bytes exceeds the agent's limit of 1024 bytes"
    }

    def chunks() -> Iterator[bytes]:  # no length known: sent chunked
        for _ in range(64):
            yield b"\0" * 4096

    resp = httpx.post(f"{small.url}/v1/profile", headers=AUTH, content=chunks(), timeout=30)
    assert resp.status_code == 413
    assert resp.json() == {"error": "upload exceeds the agent's limit of 1024 bytes"}
    small.wait_queue(waiting=0, running=0)


def test_corrupt_model_is_a_400_and_the_agent_keeps_serving(agent, model, tmp_path, monkeypatch):
    agent_tmp = tmp_path / "agent-tmp"
    agent_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(agent_tmp))  # where uploads go
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf" * 10)
    resp = post_model(agent.url, bad)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert "model.onnx" in error and "\n" not in error
    assert str(agent_tmp) not in error  # the agent's temp paths are not shown
    ok = post_model(agent.url, model)
    assert ok.status_code == 200, ok.text
    assert ok.json()["n"] == 3 and ok.json()["fingerprint_id"] == agent.info()["fingerprint"]["id"]
    assert list(agent_tmp.iterdir()) == []  # every upload's temp dir is gone


def test_client_vanishing_mid_upload_does_not_wedge_the_agent(agent, model):
    with socket.create_connection(("127.0.0.1", agent.port)) as s:
        s.sendall(raw_upload_headers(agent.port, 50_000_000) + b"\0" * 10_000)
        agent.wait_queue(waiting=1)  # its upload is in progress
    agent.wait_queue(waiting=0, running=0)  # ... and abandoned, holding nothing
    resp = post_model(agent.url, model)
    assert resp.status_code == 200, resp.text


def test_stalled_upload_times_out_with_408(start_agent):
    quick = start_agent(read_timeout_s=0.3)
    with socket.create_connection(("127.0.0.1", quick.port), timeout=10) as s:
        s.sendall(raw_upload_headers(quick.port, 1000) + b"\0" * 10)
        answer = b""
        while chunk := s.recv(65536):  # the agent closes the connection after its answer
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408"), answer
    assert "upload stalled: no data for 0.3 s" in answer
    quick.wait_queue(waiting=0, running=0)


def test_jobs_run_one_at_a_time(agent, model, monkeypatch):
    active, peak, lock = [0], [0], threading.Lock()

    def measure(device, path, warmup, iters, repeats=3):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return LatencyStats.from_samples([1.0], warmup)

    monkeypatch.setattr(target, "measure", measure)
    threads = [in_thread(lambda: post_model(agent.url, model)) for _ in range(4)]
    for thread, _ in threads:
        thread.join(20)
    assert [out[0].status_code for _, out in threads] == [200] * 4
    assert peak[0] == 1


def test_full_queue_answers_503_with_retry_after(start_agent, model, blocked_measure):
    one = start_agent(max_queue=1)
    first, out1 = in_thread(lambda: post_model(one.url, model))
    one.wait_queue(running=1, waiting=0)
    second, out2 = in_thread(lambda: post_model(one.url, model))
    one.wait_queue(running=1, waiting=1)
    resp = post_model(one.url, model)
    assert resp.status_code == 503
    assert resp.json() == {"error": "device busy: 1 measurements queued, limit 1"}
    assert int(resp.headers["retry-after"]) >= 1
    blocked_measure.set()
    first.join(10), second.join(10)
    assert out1[0].status_code == out2[0].status_code == 200


def test_job_over_the_time_limit_is_504_and_keeps_the_device(start_agent, model, blocked_measure):
    strict = start_agent(measure_timeout_s=0.3)
    resp = post_model(strict.url, model)
    assert resp.status_code == 504 and "limit of 0.3 s" in resp.json()["error"]
    assert strict.info()["queue"]["running"] == 1  # the measurement still owns the device
    blocked_measure.set()
    strict.wait_queue(running=0)
    resp = post_model(strict.url, model)
    assert resp.status_code == 200


def test_unexpected_error_is_a_one_line_500(agent, model, monkeypatch, caplog):
    def measure(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(target, "measure", measure)
    resp = post_model(agent.url, model)
    assert resp.status_code == 500 and resp.json() == {"error": "agent error: boom"}
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)
    assert agent.info()["queue"] == {"running": 0, "waiting": 0, "max": 8}


def test_infer_never_unpickles_uploads(agent, model):
    buf = io.BytesIO()
    np.savez(
        buf,
        model=np.frombuffer(model.read_bytes(), np.uint8),
        **{"inputs/input": np.array([{"x": 1}], dtype=object)},
    )
    resp = httpx.post(f"{agent.url}/v1/infer", headers=AUTH, content=buf.getvalue())
    assert resp.status_code == 400
    assert "allow_pickle=False" in resp.json()["error"]


def test_engine_on_the_cpu_device_is_a_400(agent, model):
    resp = httpx.post(f"{agent.url}/v1/engine", headers=AUTH, content=model.read_bytes())
    assert resp.status_code == 400
    assert resp.json()["error"].startswith(
        "device 'cpu' runs onnxruntime and has no TensorRT engines; use a TensorRT device"
    )


# -- tokens and serving -----------------------------------------------------------------
def test_token_from_env_then_file(tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPLSP_AGENT_TOKEN", raising=False)
    token_file = tmp_path / "agent.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    assert load_agent_token(token_file) == TOKEN
    monkeypatch.setenv("DEEPLSP_AGENT_TOKEN", "from-the-environment-0123")
    assert load_agent_token(token_file) == "from-the-environment-0123"
    assert load_agent_token(None) == "from-the-environment-0123"


def test_token_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPLSP_AGENT_TOKEN", raising=False)
    with pytest.raises(DeepLSPError, match="set DEEPLSP_AGENT_TOKEN, or .* --token-file"):
        load_agent_token(None)
    token_file = tmp_path / "agent.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o644)
    if os.name == "posix":
        with pytest.raises(DeepLSPError, match=f"mode 644.*chmod 600 {token_file}"):
            load_agent_token(token_file)
    token_file.chmod(0o600)
    token_file.write_text("short")
    with pytest.raises(DeepLSPError, match="too short .5 characters, at least 16"):
        load_agent_token(token_file)
    with pytest.raises(DeepLSPError, match="cannot read the agent token file"):
        load_agent_token(tmp_path / "missing.token")
    monkeypatch.setenv("DEEPLSP_AGENT_TOKEN", "tiny")
    with pytest.raises(DeepLSPError, match=r"from \$DEEPLSP_AGENT_TOKEN is too short"):
        load_agent_token(None)
    with pytest.raises(DeepLSPError, match="at least 16"):
        create_app(get_device("cpu"), "tiny")
    new = generate_token()
    assert len(new) >= 40 and new != generate_token()


def test_serve_announces_itself_and_warns_off_loopback(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: ran.append(self.config))
    with contextlib.ExitStack() as stack:
        import logging

        logger = logging.getLogger("deeplsp")
        stack.callback(setattr, logger, "handlers", list(logger.handlers))
        stack.callback(logger.setLevel, logger.level)
        serve(get_device("cpu"), host="0.0.0.0", port=9999, token=TOKEN, max_queue=2)
    out, err = capsys.readouterr()
    assert "serving device 'cpu'" in out and "http://0.0.0.0:9999" in out
    assert "reachable from the network" in err
    assert ran[0].port == 9999 and ran[0].timeout_keep_alive > 0
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("orin.local")
