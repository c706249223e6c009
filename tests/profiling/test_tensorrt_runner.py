"""TensorRT runner: its logic (buffers, copies, event timing, cleanup, caching) against a fake
pycuda/tensorrt pair here, and the real thing against ONNX Runtime where TensorRT is."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

import profiling.tensorrt_runner as tr
from deeplsp.errors import DeepLSPError
from export.tensorrt_export import EngineConfig, build_engine
from profiling.runner import LatencyStats
from profiling.tensorrt_runner import TensorRTRunner, measure_onnx_tensorrt, middle_by_median

H2D_MS, D2H_MS, EXEC_MS = 0.25, 0.5, 2.0  # the fake device's clock per operation


# -- a fake pycuda.driver: device memory is bytes, time advances per operation ---------
class FakeCuda:
    def __init__(self):
        self.clock, self.next_ptr = 0.0, 4096
        self.memory: dict[int, bytearray] = {}
        self.contexts: list[FakeContext] = []

    def init(self):
        pass

    def Device(self, index):  # noqa: N802 - pycuda's name
        return FakeDevice(self, index)

    def pagelocked_empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def mem_alloc(self, nbytes):
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + nbytes
        self.memory[ptr] = bytearray(nbytes)
        return FakeAllocation(self, ptr)

    def memcpy_htod_async(self, dest, src, stream):
        self.memory[int(dest)][:] = np.ascontiguousarray(src).tobytes()
        self.clock += H2D_MS

    def memcpy_dtoh_async(self, dest, src, stream):
        dest[...] = np.frombuffer(bytes(self.memory[int(src)]), dest.dtype).reshape(dest.shape)
        self.clock += D2H_MS

    def Stream(self):  # noqa: N802
        return types.SimpleNamespace(handle=7, synchronize=lambda: None)

    def Event(self):  # noqa: N802
        return FakeEvent(self)


class FakeDevice:
    def __init__(self, cuda, index):
        self.cuda, self.index = cuda, index

    def name(self):
        return "Fake Orin"

    def compute_capability(self):
        return (8, 7)

    def make_context(self):
        ctx = FakeContext()
        self.cuda.contexts.append(ctx)
        return ctx


class FakeContext:
    def __init__(self):
        self.popped = self.detached = False

    def pop(self):
        self.popped = True

    def detach(self):
        self.detached = True


class FakeAllocation:
    def __init__(self, cuda, ptr):
        self.cuda, self.ptr = cuda, ptr

    def __int__(self):
        return self.ptr

    def free(self):
        del self.cuda.memory[self.ptr]


class FakeEvent:
    def __init__(self, cuda):
        self.cuda, self.t = cuda, None

    def record(self, stream=None):
        self.t = self.cuda.clock
        return self

    def synchronize(self):
        return self

    def time_till(self, other):
        return other.t - self.t


# -- a fake tensorrt runtime: one engine computing logits = 2 * input + 1 ---------------
INPUT, OUTPUT = "TensorIOMode.INPUT", "TensorIOMode.OUTPUT"


class FakeEngine:
    def __init__(self, cuda, tensors):
        self.cuda, self.tensors = cuda, tensors  # name -> (shape, dtype, mode)

    num_io_tensors = property(lambda self: len(self.tensors))

    def get_tensor_name(self, i):
        return list(self.tensors)[i]

    def get_tensor_shape(self, name):
        return self.tensors[name][0]

    def get_tensor_dtype(self, name):
        return self.tensors[name][1]

    def get_tensor_mode(self, name):
        return self.tensors[name][2]

    def create_execution_context(self):
        return FakeExecutionContext(self)


class FakeExecutionContext:
    def __init__(self, engine):
        self.engine, self.addresses = engine, {}

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream_handle):
        assert stream_handle == 7
        mem = self.engine.cuda.memory
        x = np.frombuffer(bytes(mem[self.addresses["input"]]), np.float32)
        mem[self.addresses["logits"]][:] = (2 * x + 1).astype(np.float32).tobytes()
        self.engine.cuda.clock += EXEC_MS
        return True


def make_fake_trt(cuda, input_shape=(1, 3, 4, 4)):
    tensors = {
        "input": (input_shape, np.float32, INPUT),
        "logits": (input_shape, np.float32, OUTPUT),
    }

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return FakeEngine(cuda, tensors) if data == b"ENGINE" else None

    class Logger:
        WARNING = 2

        def __init__(self, level):
            assert level == Logger.WARNING

    return types.SimpleNamespace(
        __version__="10.3.0",
        Logger=Logger,
        Runtime=Runtime,
        TensorIOMode=types.SimpleNamespace(INPUT=INPUT, OUTPUT=OUTPUT),
        nptype=lambda dt: dt,
    )


@pytest.fixture
def fake(monkeypatch):
    cuda = FakeCuda()
    state = types.SimpleNamespace(cuda=cuda, input_shape=(1, 3, 4, 4))

    monkeypatch.setattr(tr, "require_tensorrt", lambda: make_fake_trt(cuda, state.input_shape))
    monkeypatch.setattr(tr, "require_pycuda", lambda: cuda)
    return state


def test_runner_infers_through_device_buffers(fake):
    with TensorRTRunner(b"ENGINE", precision="fp16") as r:
        assert r.input_specs() == {"input": ((1, 3, 4, 4), np.float32)}
        x = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
        out = r.infer({"input": x})
        np.testing.assert_array_equal(out["logits"], 2 * x + 1)
        assert len(fake.cuda.memory) == 2  # one device buffer per I/O tensor
        with pytest.raises(DeepLSPError, match="missing input"):
            r.infer({})
        with pytest.raises(DeepLSPError, match=r"expects \(1, 3, 4, 4\)"):
            r.infer({"input": np.zeros((2, 3, 4, 4), np.float32)})
    ctx = fake.cuda.contexts[0]
    assert ctx.popped and ctx.detached and fake.cuda.memory == {}
    assert not r.is_active


def test_measure_times_compute_and_copies_apart_with_events(fake):
    with TensorRTRunner(b"ENGINE", precision="fp16") as r:
        stats = r.measure(warmup=2, iters=5)
        assert isinstance(stats, LatencyStats)
        assert stats.n == 5 and stats.warmup == 2
        assert stats.median == pytest.approx(EXEC_MS) and stats.std == 0.0  # compute only
        assert stats.copy_median == pytest.approx(H2D_MS + D2H_MS)
        assert stats.settings == {
            "runtime": "tensorrt",
            "version": "10.3.0",
            "precision": "fp16",
            "device": "Fake Orin",
            "compute_capability": "8.7",
            "device_index": 0,
            "timing": "cuda events; copies apart",
        }
        assert r._timed_runs_impl(r.random_inputs(), 3)[0] == [EXEC_MS] * 3
        with pytest.raises(DeepLSPError, match="iters"):
            r.measure(warmup=0, iters=0)


def test_activation_failures_are_one_line_and_release_the_context(fake, tmp_path):
    with pytest.raises(DeepLSPError) as e:
        TensorRTRunner(b"garbage").activate()
    assert "cannot deserialize engine bytes" in str(e.value) and "\n" not in str(e.value)
    fake.input_shape = (-1, 3, 4, 4)
    r = TensorRTRunner(b"ENGINE")
    with pytest.raises(DeepLSPError, match="dynamic shape"):
        r.activate()
    assert not r.is_active
    assert all(c.popped and c.detached for c in fake.cuda.contexts)
    assert len(fake.cuda.contexts) == 2 and fake.cuda.memory == {}
    with pytest.raises(DeepLSPError, match="cannot read TensorRT engine"):
        TensorRTRunner(tmp_path / "missing.engine").activate()
    with pytest.raises(DeepLSPError, match="device_index"):
        TensorRTRunner(b"ENGINE", device_index=-1)


def test_runner_reads_precision_from_engine_metadata(fake, tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"ENGINE")
    (tmp_path / "m.engine.json").write_text('{"precision": "int8"}')
    assert TensorRTRunner(engine).precision == "int8"
    assert TensorRTRunner(engine, precision="fp32").precision == "fp32"
    assert TensorRTRunner(tmp_path / "other.engine").precision is None
    with TensorRTRunner(engine) as r:  # re-activation after a full cycle works
        pass
    with r:
        assert r.infer(r.random_inputs())["logits"].shape == (1, 3, 4, 4)


def test_runner_without_tensorrt_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(DeepLSPError, match=r"pip install 'deeplsp\[tensorrt\]'"):
        TensorRTRunner(b"ENGINE").activate()


# -- measure_onnx_tensorrt: cache and repeat selection --------------------------------
def _stats(median: float) -> LatencyStats:
    return LatencyStats.from_samples([median], warmup=0)


def test_middle_by_median():
    runs = [_stats(3.0), _stats(1.0), _stats(2.0)]
    assert middle_by_median(runs).median == 2.0
    assert middle_by_median([_stats(5.0)]).median == 5.0
    with pytest.raises(DeepLSPError):
        middle_by_median([])


def test_measure_onnx_tensorrt_builds_once_and_returns_the_middle_repeat(tmp_path, monkeypatch):
    builds, medians = [], iter([3.0, 1.0, 2.0, 9.0])
    trt = types.SimpleNamespace(__version__="10.3.0")
    monkeypatch.setattr(tr, "require_tensorrt", lambda: trt)
    monkeypatch.setattr(
        tr, "read_gpu", lambda index=0: {"name": "Orin", "compute_capability": "8.7"}
    )

    def fake_build(onnx_path, engine_path, config, calibration=None):
        builds.append(Path(engine_path))
        Path(engine_path).parent.mkdir(parents=True, exist_ok=True)
        Path(engine_path).write_bytes(b"ENGINE")
        return {}

    class FakeRunner:
        def __init__(self, engine, precision=None):
            assert Path(engine).read_bytes() == b"ENGINE" and precision == "fp16"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def measure(self, warmup, iters):
            return _stats(next(medians))

    monkeypatch.setattr(tr, "build_engine", fake_build)
    monkeypatch.setattr(tr, "TensorRTRunner", FakeRunner)
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"onnx")
    cache = tmp_path / "engines"
    stats = measure_onnx_tensorrt(onnx_path, EngineConfig(), 1, 5, repeats=3, cache_dir=cache)
    assert stats.median == 2.0
    assert len(builds) == 1 and builds[0].parent == cache and builds[0].suffix == ".engine"
    assert len(builds[0].stem) == 64  # the sha256 cache key
    assert measure_onnx_tensorrt(onnx_path, EngineConfig(), 1, 5, cache_dir=cache).median == 9.0
    assert len(builds) == 1  # reused
    with pytest.raises(DeepLSPError, match="repeats"):
        measure_onnx_tensorrt(onnx_path, EngineConfig(), 1, 5, repeats=0, cache_dir=cache)
    with pytest.raises(DeepLSPError, match="cannot read ONNX"):
        measure_onnx_tensorrt(tmp_path / "no.onnx", EngineConfig(), 1, 5, cache_dir=cache)


# -- real TensorRT ----------------------------------------------------------------------
def _conv_onnx(path: Path) -> Path:
    """Conv(3->8, 3x3) + Relu on a 1x3x16x16 input, random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.2, "w")
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8, 16, 16])
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["logits"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], initializer=[w]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-2), ("fp16", 5e-2)])
def test_real_engine_matches_onnxruntime_and_measures(tmp_path, precision, atol):
    from profiling.onnxruntime_runner import OnnxRuntimeRunner

    onnx_path = _conv_onnx(tmp_path / "m.onnx")
    engine = tmp_path / "m.engine"
    build_engine(onnx_path, engine, EngineConfig(precision=precision, workspace_mb=256))
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    with OnnxRuntimeRunner(onnx_path) as ort_runner:
        expected = ort_runner.infer({"input": x})["logits"]
    with TensorRTRunner(engine) as r:
        assert r.input_specs() == {"input": ((1, 3, 16, 16), np.float32)}
        got = r.infer({"input": x})["logits"]
        stats = r.measure({"input": x}, warmup=5, iters=20)
    # fp32 engines may use TF32 on Ampere and newer, hence the loose fp32 tolerance.
    np.testing.assert_allclose(got, expected, atol=atol, rtol=1e-2)
    assert stats.n == 20 and 0 < stats.min <= stats.median <= stats.p90
    assert stats.copy_median is not None and stats.copy_median > 0
    assert stats.settings["precision"] == precision and stats.settings["device"]


@pytest.mark.trt
@pytest.mark.gpu
def test_real_measure_onnx_tensorrt_caches_the_engine(tmp_path):
    onnx_path = _conv_onnx(tmp_path / "m.onnx")
    cfg = EngineConfig(precision="fp16", workspace_mb=256)
    cache = tmp_path / "engines"
    first = measure_onnx_tensorrt(onnx_path, cfg, warmup=3, iters=10, repeats=3, cache_dir=cache)
    (engine,) = cache.glob("*.engine")
    mtime = engine.stat().st_mtime_ns
    second = measure_onnx_tensorrt(onnx_path, cfg, warmup=3, iters=10, cache_dir=cache)
    assert engine.stat().st_mtime_ns == mtime and (cache / (engine.name + ".json")).is_file()
    assert first.median > 0 and second.median > 0 and first.copy_median is not None
