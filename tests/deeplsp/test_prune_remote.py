"""`deeplsp prune --device cpu --device-url URL` through a real agent on 127.0.0.1 gives
the same result as the local device. The device clock is a deterministic function of
each ONNX file's MACs (patched below the agent, where both paths meet), so the two runs
can be compared exactly."""

from __future__ import annotations

import os

import pytest

import deeplsp.pruner as prune_mod
import profiling.isolated as isolated
from deeplsp.models import MODELS, ModelEntry
from deeplsp.pruner import PruneConfig, prune
from devices.config import ENV_TOKEN
from profiling.counting import count_onnx
from profiling.remote import AgentClient
from profiling.runner import LatencyStats
from tests.deeplsp.test_pruner import SMALL_PROBE, TinyNet
from tests.profiling.test_agent import TOKEN, AgentServer


def _clock(paths, threads, warmup, iters, repeats=1, kernels_except=None):
    for path in paths:
        ms = 0.02 + 2e-6 * count_onnx(path).macs
        yield LatencyStats.from_samples([ms] * iters, warmup)


@pytest.fixture
def setting(monkeypatch):
    monkeypatch.setitem(MODELS._entries, "tinynet", ModelEntry("tinynet", "t", TinyNet, "none"))
    monkeypatch.setattr(isolated, "measure_isolated_many", _clock)
    monkeypatch.setattr(prune_mod, "free_weights", SMALL_PROBE)  # its chain through the agent too
    monkeypatch.setenv(ENV_TOKEN, TOKEN)
    monkeypatch.delenv("DEEPLSP_DEVICE_URL", raising=False)
    calls = []
    profile = AgentClient.profile

    def spy(self, *args, **kw):
        calls.append(args[0])
        return profile(self, *args, **kw)

    monkeypatch.setattr(AgentClient, "profile", spy)
    server = AgentServer()
    yield server, calls
    server.close()


@pytest.mark.slow
def test_prune_through_the_agent_equals_the_local_run(tmp_path, fashionmnist_dir, setting):
    server, calls = setting

    def run(name, url):
        cfg = PruneConfig(
            model="tinynet",
            dataset="fashionmnist",
            out=str(tmp_path / name),
            data_dir=str(fashionmnist_dir),
            cache_dir=str(tmp_path / name / "cache"),
            device="cpu",
            device_url=url,
            budget_ms=2.0,  # the dense TinyNet measures about 3.9 ms on this clock
            calib_batches=2,
            calib_batch_size=16,
            ratios=(1.0, 0.75, 0.5, 0.25),
            finetune_epochs=0,
            iters=5,
            warmup=1,
        )
        return prune(cfg, log=lambda s: None)

    local = run("local", None)
    assert not calls
    remote = run("remote", server.url)
    # the table, the cache probe's chains (three rounds of 13) and the calibration models
    assert len(calls) >= remote["latency_table"]["new_rows"] + 3
    assert remote["device"]["url"] == server.url and local["device"]["url"] is None
    assert remote["fingerprint"] == local["fingerprint"]  # the agent serves this machine
    assert [g["keep"] for g in remote["groups"]] == [g["keep"] for g in local["groups"]]
    for key in ("predicted_ms", "test", "cost"):
        assert remote["pruned"][key] == local["pruned"][key], key
    settings = remote["pruned"]["latency_ms"].pop("settings")
    assert settings["agent_url"] == server.url  # timed by the agent, and says so
    local["pruned"]["latency_ms"].pop("settings")
    assert remote["pruned"]["latency_ms"] == local["pruned"]["latency_ms"]
    assert remote["pruned"]["latency_ms"]["median"] <= remote["budget_ms"]

    def searched(report):
        return [(c["keeps"], c["measured"]["latency"]["median"]) for c in report["search"]]

    assert searched(remote) == searched(local)
    assert os.path.isfile(tmp_path / "remote" / "model.onnx")
