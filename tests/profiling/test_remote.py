"""The agent client and RemoteRunner against a real agent (uvicorn on 127.0.0.1 serving
the `cpu` device), plus canned-answer sockets for the retry rules."""

from __future__ import annotations

import json
import socket
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest

from deeplsp.errors import DeepLSPError
from devices import get_device
from profiling import remote, target
from profiling.onnx_inputs import onnx_input_specs
from profiling.onnxruntime_runner import OnnxRuntimeRunner
from profiling.remote import (
    AgentAuthError,
    AgentBusy,
    AgentClient,
    AgentError,
    AgentUnreachable,
    RemoteRunner,
)
from profiling.runner import LatencyStats
from tests.profiling import test_agent as shared
from tests.profiling.test_agent import TOKEN, AgentServer, in_thread

# The agent serves from another process, where the cpu device keeps this host's channel
# multiple: so do these tests.
pytestmark = pytest.mark.host_cpu

# The agent fixtures of test_agent.py (a real agent on a free local port), not copied.
agent, start_agent = shared.agent, shared.start_agent
model, blocked_measure = shared.model, shared.blocked_measure


@pytest.fixture
def client(agent: AgentServer) -> Iterator[AgentClient]:
    with AgentClient(agent.url, TOKEN, timeout_s=60, retries=1, backoff_s=0.01) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CannedServer:
    """Answers every connection with `answer` (or hangs up on it when None); counts them."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer, self.connections = answer, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                self.connections += 1
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                if self.answer is not None:
                    conn.sendall(self.answer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def canned(status: str, body: dict, *headers: str) -> bytes:
    data = json.dumps(body).encode()
    head = [
        f"HTTP/1.1 {status}",
        "Content-Type: application/json",
        "Connection: close",
        f"Content-Length: {len(data)}",
        *headers,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


# -- against the real agent -------------------------------------------------------------
def test_remote_profile_agrees_with_local_measurement(client, model):
    # Both time the same file with the same code (target.measure: ONNX Runtime in a
    # child process, same threads) on this machine, so only noise tells them apart. On
    # a shared 2-core machine that noise reaches tens of percent, so the check is loose:
    # a factor of 3 still catches wrong units, a wrong model or a different runtime.
    cpu = get_device("cpu")
    local = target.measure(cpu, model, warmup=5, iters=30, repeats=3)
    remote_stats = client.profile(model, warmup=5, iters=30, repeats=3)
    assert isinstance(remote_stats, LatencyStats)
    assert remote_stats.n == 30 and remote_stats.warmup == 5
    assert 1 / 3 < remote_stats.median / local.median < 3
    assert remote_stats.settings["runtime"] == local.settings["runtime"] == "onnxruntime"
    assert remote_stats.settings["fingerprint_id"] == target.fingerprint(cpu)["id"]
    assert remote_stats.settings["agent_url"] == client.url


def test_remote_layer_timing_is_the_kernel_time_as_here(client, tmp_path):
    """A table layer through the agent is timed as on this machine: kernel time without
    the harness (the same code in the agent's process)."""
    from profiling.latency_table import HARNESS, LayerSig, layer_onnx

    path = tmp_path / "layer.onnx"
    path.write_bytes(layer_onnx(LayerSig("conv", 8, 16, 3, 1, 1, 1, 8, act="hardswish")))
    stats = client.profile(path, warmup=2, iters=20, repeats=1, kernels_except=HARNESS)
    assert stats.n == 20
    assert stats.settings["timed"] == f"kernel time, without {', '.join(HARNESS)}"
    assert "timed" not in client.profile(path, warmup=2, iters=5, repeats=1).settings


def test_info_matches_the_local_device(client):
    info = client.info()
    cpu = get_device("cpu")
    assert info["device"]["name"] == "cpu" and info["device"] == cpu.to_dict()
    assert info["fingerprint"]["id"] == target.fingerprint(cpu)["id"]


def test_missing_or_wrong_token(agent):
    with pytest.raises(AgentAuthError, match="no token for the DeepLSP agent"):
        AgentClient(agent.url, None)  # refused before any request
    with pytest.raises(AgentAuthError, match="refused the token .invalid token.: set DEEPLSP"):
        AgentClient(agent.url, "wrong-token-0123456789").info()
    with pytest.raises(AgentAuthError, match="spaces or non-ASCII"):
        AgentClient(agent.url, "token with spaces in it")


def test_bad_urls_are_one_line_errors():
    for url in ("ftp://orin:8765", "orin.local:8765", "http://", "http://orin:99999"):
        with pytest.raises(DeepLSPError, match="URL"):
            AgentClient(url, TOKEN)


def test_oversized_upload_is_a_clear_413(start_agent, model):
    small = start_agent(max_upload_bytes=1024)
    with AgentClient(small.url, TOKEN, retries=0) as c, pytest.raises(AgentError) as err:
        c.profile(model, warmup=1, iters=2)
    assert err.value.status == 413
    assert str(err.value) == (
        f"{small.url}: upload of {model.stat().st_size} bytes exceeds the agent's limit "
        "of 1024 bytes"
    )


def test_corrupt_model_is_a_clear_error_then_the_agent_serves(client, model, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(AgentError, match="model.onnx") as err:
        client.profile(bad, warmup=1, iters=2, repeats=1)
    assert err.value.status == 400 and "\n" not in str(err.value)
    assert client.profile(model, warmup=1, iters=2, repeats=1).n == 2
    with pytest.raises(DeepLSPError, match="does not exist"):
        client.profile(tmp_path / "missing.onnx", warmup=1, iters=2)


def test_concurrent_requests_queue_and_all_complete(agent, model, monkeypatch):
    def measure(device, path, warmup, iters, repeats=3):
        time.sleep(0.05)
        return LatencyStats.from_samples([float(iters)], warmup)

    monkeypatch.setattr(target, "measure", measure)
    with AgentClient(agent.url, TOKEN, retries=0) as c:
        runs = [in_thread(lambda i=i: c.profile(model, 1, i + 1)) for i in range(4)]
        for thread, _ in runs:
            thread.join(20)
    assert sorted(out[0].median for _, out in runs) == [1.0, 2.0, 3.0, 4.0]


def test_full_queue_is_agent_busy_then_retries_succeed(
    start_agent, model, blocked_measure, monkeypatch
):
    one = start_agent(max_queue=1)
    fill = AgentClient(one.url, TOKEN, retries=0)
    first, out1 = in_thread(lambda: fill.profile(model, 1, 2))
    one.wait_queue(running=1)
    second, out2 = in_thread(lambda: fill.profile(model, 1, 2))
    one.wait_queue(running=1, waiting=1)
    with pytest.raises(AgentBusy, match="device busy: 1 measurements queued, limit 1") as err:
        fill.profile(model, 1, 2)
    assert err.value.status == 503

    slept: list[float] = []

    def sleep(seconds: float) -> None:  # the retry's wait: free the device meanwhile
        slept.append(seconds)
        blocked_measure.set()
        time.sleep(min(seconds, 0.1))

    monkeypatch.setattr(remote, "time", types.SimpleNamespace(sleep=sleep))
    patient = AgentClient(one.url, TOKEN, retries=20, backoff_s=0.01)
    patient.max_retry_after_s = 0.5
    assert patient.profile(model, 1, 2).n == 2
    assert slept and slept[0] == 0.5  # the agent's Retry-After (1 s), capped
    first.join(10), second.join(10)
    assert out1[0].n == out2[0].n == 2
    fill.close(), patient.close()


def test_closed_port_is_unreachable_quickly():
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(AgentUnreachable) as err:
        AgentClient(url, TOKEN, retries=2, backoff_s=0.01).info()
    assert time.perf_counter() - t0 < 5
    assert str(err.value).startswith(f"cannot reach the DeepLSP agent at {url}: ")
    assert str(err.value).endswith("is `deeplsp agent serve` running there?")


def test_connection_faults_and_busy_are_retried_but_not_4xx():
    servers = {
        "hang-up": CannedServer(None),
        "busy": CannedServer(
            canned("503 Service Unavailable", {"error": "device busy"}, "Retry-After: 0")
        ),
        "bad": CannedServer(canned("422 Unprocessable Entity", {"error": "iters=0: too small"})),
    }
    try:
        expected = {"hang-up": AgentUnreachable, "busy": AgentBusy, "bad": AgentError}
        for name, server in servers.items():
            with pytest.raises(expected[name]) as err:
                AgentClient(server.url, TOKEN, retries=2, backoff_s=0.01).info()
            assert server.connections == (1 if name == "bad" else 3), name
        assert str(err.value) == f"{servers['bad'].url}: iters=0: too small"
    finally:
        for server in servers.values():
            server.close()


def test_engine_on_the_cpu_device_is_a_400(client, model, tmp_path):
    with pytest.raises(AgentError) as err:
        client.build_engine(model, tmp_path / "m.engine")
    assert err.value.status == 400
    assert str(err.value).startswith(
        f"{client.url}: device 'cpu' runs onnxruntime and has no TensorRT engines; use"
    )
    assert not (tmp_path / "m.engine").exists()


def test_build_engine_writes_the_engine_and_its_metadata(client, model, tmp_path, monkeypatch):
    from export.tensorrt_export import EngineConfig

    builds = []

    def engine_config(device, **overrides):  # the cpu agent stands in for a TensorRT one
        return EngineConfig(**{k: v for k, v in overrides.items() if v is not None})

    def build_engine(device, onnx_path, engine_path, calibration=None, config=None):
        builds.append((config, calibration))
        Path(engine_path).write_bytes(b"ENGINE" + Path(onnx_path).read_bytes()[:10])
        meta = {"onnx": str(onnx_path), "inputs": [{"name": "input", "shape": [1, 3, 32, 32]}]}
        Path(f"{engine_path}.json").write_text(json.dumps(meta))
        return meta

    def measure_engine(device, engine_path, warmup, iters, repeats=3):
        assert Path(engine_path).suffix == ".engine"
        return LatencyStats.from_samples([0.5] * iters, warmup)

    monkeypatch.setattr(target, "engine_config", engine_config)
    monkeypatch.setattr(target, "build_engine", build_engine)
    monkeypatch.setattr(target, "measure_engine", measure_engine)
    engine = tmp_path / "out" / "m.engine"
    meta = client.build_engine(model, engine)
    assert engine.read_bytes() == b"ENGINE" + model.read_bytes()[:10]
    assert meta == {"onnx": "model.onnx", "inputs": [{"name": "input", "shape": [1, 3, 32, 32]}]}
    assert json.loads(Path(f"{engine}.json").read_text()) == meta
    assert sorted(p.name for p in engine.parent.iterdir()) == ["m.engine", "m.engine.json"]
    assert client.profile(engine, 1, 4, kind="engine").median == 0.5
    assert builds[-1] == (EngineConfig(), None)  # the device's defaults
    # int8: the settings travel as parameters, the calibration batches with the model
    batches = [np.full((1, 3, 32, 32), i, np.float32) for i in range(12)]
    int8 = EngineConfig(precision="int8", workspace_mb=256, sparse=True)
    meta = client.build_engine(model, tmp_path / "q.engine", int8, batches)
    config, got = builds[-1]
    assert (config.precision, config.workspace_mb, config.sparse) == ("int8", 256, True)
    assert len(got) == 12 and all((g == b).all() for g, b in zip(got, batches, strict=True))
    assert (tmp_path / "q.engine").read_bytes() == engine.read_bytes()  # the same ONNX


def test_infer_matches_local_onnxruntime(client, model):
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with OnnxRuntimeRunner(model) as local:
        want = local.infer({"input": x})
    got = client.infer(model, {"input": x})
    assert got.keys() == want.keys() == {"logits"}
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)
    with pytest.raises(AgentError, match="input"):
        client.infer(model, {"wrong": x})


def test_remote_runner_is_a_runner(client, model, tmp_path):
    runner = RemoteRunner(client, model)
    with runner:
        assert runner.name == "remote"
        assert runner.input_specs() == {"input": ((1, 3, 32, 32), np.dtype(np.float32))}
        out = runner.infer(runner.random_inputs())
        assert out["logits"].shape == (1, 16, 32, 32)
        stats = runner.measure(warmup=1, iters=5)
        assert stats.n == 5 and stats.settings["runtime"] == "onnxruntime"
        settings = runner.settings()
        assert settings["agent_url"] == client.url
        assert settings["fingerprint_id"] == target.fingerprint(get_device("cpu"))["id"]
        with pytest.raises(DeepLSPError, match="input shapes"):
            runner.measure({"input": np.zeros((2, 3, 32, 32), np.float32)}, 1, 2)
    with pytest.raises(RuntimeError, match="not active"):
        runner.measure()
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine")
    with RemoteRunner(client, engine) as r, pytest.raises(DeepLSPError, match="onnx_path="):
        r.input_specs()
    with RemoteRunner(client, engine, onnx_path=model) as r:
        assert list(r.input_specs()) == ["input"] and r.kind == "engine"


def test_input_specs_need_fixed_shapes(tmp_path, model):
    proto = onnx.load(model)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(proto, tmp_path / "dynamic.onnx")
    with pytest.raises(DeepLSPError, match="'input' .* has a dynamic shape"):
        onnx_input_specs(tmp_path / "dynamic.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(DeepLSPError, match="cannot read ONNX file"):
        onnx_input_specs(tmp_path / "junk.onnx")


def test_target_refuses_an_agent_measuring_with_other_settings(agent, model, monkeypatch):
    """A remote device asked for other settings than the agent measures with would get
    latencies of the wrong configuration: a clear error instead."""
    from dataclasses import replace

    from devices import resolve_device

    monkeypatch.setenv("DEEPLSP_AGENT_TOKEN", TOKEN)
    remote = resolve_device("cpu", agent.url, config={})
    cores = target.fingerprint(remote)["cores"]
    assert target.measure(replace(remote, threads=cores), model, 1, 3, repeats=1).n == 3
    with pytest.raises(DeepLSPError, match=f"{cores} threads \\(asked {cores + 1}; start it"):
        target.measure(replace(remote, threads=cores + 1), model, 1, 3, repeats=1)
    with pytest.raises(DeepLSPError, match="serves device 'cpu', not 'gpu'"):
        target.fingerprint(replace(resolve_device("cpu", agent.url, config={}), name="gpu"))
