from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deeplsp.errors import DeepLSPError
from devices import get_device
from profiling.onnxruntime_runner import OnnxRuntimeRunner
from profiling.profile import profile_onnx
from profiling.runner import LatencyStats


def _conv_model(path: Path, batch: int | str = 1) -> Path:
    """A 1-conv ONNX graph written with onnx.helper: y = conv(x, w), 3->4 channels, 3x3."""
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4, 8, 8])
    node = helper.make_node("Conv", ["input", "w"], ["logits"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [x], [y], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_latency_stats_from_known_samples():
    s = LatencyStats.from_samples([5.0, 1.0, 3.0, 2.0, 4.0], warmup=2, settings={"t": 1})
    assert (s.median, s.min, s.mean, s.n, s.warmup) == (3.0, 1.0, 3.0, 5, 2)
    assert s.p90 == pytest.approx(4.6)
    assert s.std == pytest.approx(np.std([1, 2, 3, 4, 5], ddof=1))
    assert s.copy_median is None and s.to_dict()["settings"] == {"t": 1}
    with pytest.raises(ValueError):
        LatencyStats.from_samples([], warmup=0)


def test_runner_infers_correctly_and_measures(tmp_path):
    path = _conv_model(tmp_path / "m.onnx")
    with OnnxRuntimeRunner(path, threads=1) as r:
        assert r.input_specs() == {"input": ((1, 3, 8, 8), np.float32)}
        x = np.ones((1, 3, 8, 8), np.float32)
        out = r.infer({"input": x})["logits"]
        assert out.shape == (1, 4, 8, 8)
        assert out[0, 0, 4, 4] == 27.0 and out[0, 0, 0, 0] == 12.0  # interior / corner
        stats = r.measure(warmup=2, iters=7)
    assert stats.n == 7 and stats.warmup == 2
    assert 0 < stats.min <= stats.median <= stats.p90
    assert stats.settings["intra_op_threads"] == 1
    assert not r.is_active


def test_runner_must_be_active_and_validates_arguments(tmp_path):
    path = _conv_model(tmp_path / "m.onnx")
    r = OnnxRuntimeRunner(path)
    with pytest.raises(RuntimeError, match="not active"):
        r.infer({})
    with pytest.raises(DeepLSPError):
        OnnxRuntimeRunner(path, threads=0)
    with r, pytest.raises(DeepLSPError, match="iters"):
        r.measure(iters=0)


def test_dynamic_batch_is_refused_for_timing(tmp_path):
    path = _conv_model(tmp_path / "dyn.onnx", batch="N")
    with OnnxRuntimeRunner(path) as r, pytest.raises(DeepLSPError, match="dynamic shape"):
        r.measure(iters=1)


def test_corrupt_onnx_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(DeepLSPError, match="cannot load"):
        with OnnxRuntimeRunner(bad):
            pass


def test_profile_onnx_records_latency_cost_and_fingerprint(tmp_path):
    path = _conv_model(tmp_path / "m.onnx")
    cpu = get_device("cpu")
    r = profile_onnx(path, cpu, warmup=1, iters=5)
    assert r["latency_ms"]["n"] == 5
    assert r["cost"] == {"macs": 4 * 8 * 8 * 3 * 3 * 3, "params": 4 * 3 * 3 * 3}
    assert r["inputs"] == {"input": [1, 3, 8, 8]}
    assert r["fingerprint"]["id"] and r["device"]["name"] == "cpu"
    with pytest.raises(DeepLSPError, match="does not exist"):
        profile_onnx(tmp_path / "missing.onnx", cpu)
    assert r["latency_ms"]["settings"]["intra_op_threads"] == cpu.resolved_threads()


def test_measure_isolated_runs_in_a_child_process(tmp_path):
    from profiling.isolated import measure_isolated

    stats = measure_isolated(_conv_model(tmp_path / "m.onnx"), threads=1, warmup=1, iters=5)
    assert stats.n == 5 and 0 < stats.min <= stats.median
    assert stats.settings["intra_op_threads"] == 1
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(DeepLSPError, match="cannot load"):
        measure_isolated(bad, threads=1, warmup=0, iters=1)


def _events(runs: list[list[tuple[str, int]]]) -> list[dict]:
    """An ONNX Runtime profile's events: per run, its nodes' (op, duration in us)."""
    events, ts = [], 0
    for nodes in runs:
        start = ts
        for op, dur in nodes:
            events.append(
                {
                    "cat": "Node",
                    "name": f"{op}_kernel_time",
                    "ts": ts,
                    "dur": dur,
                    "args": {"op_name": op},
                }  # fmt: skip
            )
            ts += dur + 1
        events.append({"cat": "Session", "name": "model_run", "ts": start, "dur": ts - start})
        ts += 5
    return events


def test_kernel_samples_sum_each_runs_nodes_except_the_skipped_ops():
    from profiling.onnxruntime_runner import kernel_samples

    warm = [("ReorderInput", 9), ("Conv", 90), ("ReorderOutput", 9)]
    runs = [warm, [("ReorderInput", 3), ("Conv", 20), ("Mul", 4), ("ReorderOutput", 3)],
            [("ReorderInput", 2), ("Conv", 22), ("Mul", 5), ("ReorderOutput", 4)]]  # fmt: skip
    events = _events(runs)
    assert kernel_samples(events, 2, ("ReorderInput", "ReorderOutput")) == [0.024, 0.027]
    assert kernel_samples(events, 1, ()) == [0.033]
    with pytest.raises(DeepLSPError, match="holds 3 runs, fewer than the 4 timed"):
        kernel_samples(events, 4, ())


def test_kernel_mode_times_the_layer_without_its_harness(tmp_path):
    """With kernels_except a window's samples are the profiler's kernel times, and every
    window gets its own profile (ending one ends profiling for its session)."""
    path = _conv_model(tmp_path / "m.onnx")
    with OnnxRuntimeRunner(path, threads=1, kernels_except=("ReorderInput",)) as r:
        first = r.measure(warmup=2, iters=20)
        second = r.measure(warmup=2, iters=20)  # profiling restarts for every window
        assert r.infer(r.random_inputs())["logits"].shape == (1, 4, 8, 8)
        profiles = Path(r._profile_dir.name)
        assert len(list(profiles.iterdir())) <= 1  # each window's read and removed
    assert not profiles.exists()
    assert first.n == second.n == 20 and first.median > 0 and second.median > 0
    assert first.settings["timed"] == "kernel time, without ReorderInput"


def test_measure_isolated_times_kernels_in_the_child(tmp_path):
    from profiling.isolated import measure_isolated

    stats = measure_isolated(
        _conv_model(tmp_path / "m.onnx"), threads=1, warmup=1, iters=5, kernels_except=["X"]
    )
    assert stats.n == 5 and stats.settings["timed"] == "kernel time, without X"
