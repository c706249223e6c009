"""TensorRT engine building: configuration, messages, metadata and cache keys without a GPU
(the orchestration runs against a small fake `tensorrt`), and real builds where TensorRT is."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import export.tensorrt_export as te
from deeplsp.errors import DeepLSPError
from export.tensorrt_export import (
    EngineConfig,
    build_engine,
    check_calibration,
    check_fixed_shapes,
    check_tensorrt_supports,
    engine_cache_key,
    engine_metadata,
    format_parser_errors,
    gpu_label,
    metadata_path,
    precision_warnings,
    require_pycuda,
    require_tensorrt,
)

GPU = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "driver": "550.54.15"}


def conv_onnx(path: Path, seed: int = 0, batch: int | str = 1) -> Path:
    """Conv(3->8, 3x3) + Relu on a 1x3x16x16 input, random weights."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.2, "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b")
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 16, 16])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 8, 16, 16])
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c"], ["logits"], name="relu1"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def one_line(exc_info: pytest.ExceptionInfo) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    return msg


# -- configuration ------------------------------------------------------------------
def test_engine_config_defaults_round_trip_and_path_normalisation(tmp_path):
    c = EngineConfig()
    assert (c.precision, c.workspace_mb, c.sparse, c.timing_cache) == ("fp16", 1024, False, None)
    d = EngineConfig(
        precision="int8",
        timing_cache=str(tmp_path / "t.cache"),
        calibration_cache=tmp_path / "c.cache",
        builder_optimization_level=5,
        sparse=True,
    )
    assert d.timing_cache == tmp_path / "t.cache" and isinstance(d.timing_cache, Path)
    as_dict = d.to_dict()
    assert as_dict["timing_cache"] == str(tmp_path / "t.cache")
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert EngineConfig.from_dict(as_dict) == d
    with pytest.raises(DeepLSPError, match="unknown EngineConfig fields: colour"):
        EngineConfig.from_dict({"colour": 1})


@pytest.mark.parametrize(
    ("kwargs", "accepted"),
    [
        ({"precision": "bf16"}, "one of fp32, fp16, int8"),
        ({"workspace_mb": 0}, "positive integer"),
        ({"workspace_mb": 1.5}, "positive integer"),
        ({"workspace_mb": True}, "positive integer"),
        ({"sparse": "yes"}, "True or False"),
        ({"builder_optimization_level": 6}, "0..5"),
        ({"builder_optimization_level": -1}, "0..5"),
        ({"timing_cache": 3}, "file path or None"),
        ({"calibration_cache": Path("c.cache")}, "only to precision 'int8'"),
    ],
)
def test_engine_config_rejects_bad_values_in_one_line(kwargs, accepted):
    with pytest.raises(DeepLSPError) as e:
        EngineConfig(**kwargs)
    assert accepted in one_line(e)


def test_engine_cache_key_changes_with_each_input():
    onnx_bytes, cfg = b"model-bytes", EngineConfig()
    key = engine_cache_key(onnx_bytes, cfg, "10.3.0", "Orin (sm 8.7)")
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == engine_cache_key(onnx_bytes, EngineConfig(), "10.3.0", "Orin (sm 8.7)")
    variants = [
        engine_cache_key(b"other-bytes", cfg, "10.3.0", "Orin (sm 8.7)"),
        engine_cache_key(onnx_bytes, cfg, "10.4.0", "Orin (sm 8.7)"),
        engine_cache_key(onnx_bytes, cfg, "10.3.0", "H100 (sm 9.0)"),
        engine_cache_key(onnx_bytes, EngineConfig(precision="fp32"), "10.3.0", "Orin (sm 8.7)"),
        engine_cache_key(onnx_bytes, EngineConfig(workspace_mb=2048), "10.3.0", "Orin (sm 8.7)"),
        engine_cache_key(onnx_bytes, EngineConfig(sparse=True), "10.3.0", "Orin (sm 8.7)"),
        engine_cache_key(
            onnx_bytes, EngineConfig(builder_optimization_level=1), "10.3.0", "Orin (sm 8.7)"
        ),
    ]
    assert len({key, *variants}) == len(variants) + 1
    # The timing cache only speeds the build up; the engine is the same.
    timed = EngineConfig(timing_cache=Path("t.cache"))
    assert engine_cache_key(onnx_bytes, timed, "10.3.0", "Orin (sm 8.7)") == key


def test_small_helpers():
    assert metadata_path("runs/r18/model.engine") == Path("runs/r18/model.engine.json")
    assert gpu_label(GPU) == "NVIDIA H100 80GB HBM3 (sm 9.0)"
    assert gpu_label(None) == gpu_label({"name": None}) == "unknown GPU"
    check_fixed_shapes({"input": (1, 3, 16, 16)})
    with pytest.raises(DeepLSPError) as e:
        check_fixed_shapes({"input": (-1, 3, 16, 16)})
    assert "dynamic shape (-1, 3, 16, 16)" in one_line(e) and "fixed input shape" in str(e.value)


# -- TensorRT 10 vs 11 ---------------------------------------------------------------
def _trt_api(version: str, flags: tuple[str, ...], calibrator: bool) -> types.SimpleNamespace:
    ns = types.SimpleNamespace(__version__=version, BuilderFlag=types.SimpleNamespace())
    for f in flags:
        setattr(ns.BuilderFlag, f, f)
    if calibrator:
        ns.IInt8EntropyCalibrator2 = object
    return ns


def test_check_tensorrt_supports_tensorrt10_and_names_what_tensorrt11_lacks():
    trt10 = _trt_api("10.3.0", ("FP16", "INT8", "SPARSE_WEIGHTS"), calibrator=True)
    for precision in ("fp32", "fp16", "int8"):
        check_tensorrt_supports(trt10, EngineConfig(precision=precision, sparse=True))
    trt11 = _trt_api("11.0.0", ("SPARSE_WEIGHTS",), calibrator=False)
    check_tensorrt_supports(trt11, EngineConfig(precision="fp32", sparse=True))
    with pytest.raises(DeepLSPError) as e:
        check_tensorrt_supports(trt11, EngineConfig(precision="int8"))
    assert "TensorRT 11.0.0 has no IInt8EntropyCalibrator2" in one_line(e)
    with pytest.raises(DeepLSPError) as e:
        check_tensorrt_supports(trt11, EngineConfig(precision="fp16"))
    assert "no BuilderFlag.FP16" in one_line(e) and "'fp32'" in str(e.value)
    no_sparse = _trt_api("10.0.0", ("FP16", "INT8"), calibrator=True)
    with pytest.raises(DeepLSPError, match="SPARSE_WEIGHTS"):
        check_tensorrt_supports(no_sparse, EngineConfig(precision="fp32", sparse=True))


# -- pure pieces of the build -----------------------------------------------------------
def test_format_parser_errors_reports_the_first_error_and_a_count():
    errs = [
        {
            "desc": "Unsupported operator Foo\nmore detail",
            "node": 3,
            "node_name": "foo_1",
            "operator": "Foo",
        },  # fmt: skip
        {"desc": "second", "node": 4, "node_name": None, "operator": None},
    ]
    msg = format_parser_errors("m.onnx", errs)
    assert msg == (
        "TensorRT cannot parse m.onnx at node 3 'foo_1' (Foo): Unsupported operator Foo (+1 more)"
    )
    assert format_parser_errors("m.onnx", [{"desc": "bad proto", "node": -1}]) == (
        "TensorRT cannot parse m.onnx: bad proto"
    )
    assert "reported no error" in format_parser_errors("m.onnx", [])


def test_check_calibration(tmp_path):
    shapes = {"input": (1, 3, 4, 4)}
    batches = check_calibration([np.ones((1, 3, 4, 4))], shapes, None)  # float64 in
    assert batches[0].dtype == np.float32 and batches[0].flags["C_CONTIGUOUS"]
    with pytest.raises(DeepLSPError) as e:
        check_calibration(None, shapes, None)
    assert "needs calibration data" in one_line(e)
    with pytest.raises(DeepLSPError, match=r"batch 1 has shape \(2, 3, 4, 4\)"):
        check_calibration([np.ones((1, 3, 4, 4)), np.ones((2, 3, 4, 4))], shapes, None)
    with pytest.raises(DeepLSPError, match="dtype int64"):
        check_calibration([np.ones((1, 3, 4, 4), np.int64)], shapes, None)
    with pytest.raises(DeepLSPError, match="one-input networks"):
        check_calibration([np.ones(1)], {"a": (1,), "b": (1,)}, None)
    cache = tmp_path / "calib.cache"
    with pytest.raises(DeepLSPError):  # a cache path that does not exist yet is no data
        check_calibration([], shapes, cache)
    cache.write_bytes(b"TRT-8601-EntropyCalibration2\n")
    assert check_calibration([], shapes, cache) == []


def test_precision_warnings():
    assert precision_warnings("fp16", True, True) == []
    assert precision_warnings("fp16", None, None) == []  # TensorRT 11: no such query
    assert precision_warnings("fp32", False, False) == []
    (w,) = precision_warnings("fp16", False, True)
    assert "platform_has_fast_fp16 is False" in w
    assert len(precision_warnings("int8", False, False)) == 2


def test_engine_metadata_composition():
    cfg = EngineConfig(precision="fp16", workspace_mb=512, sparse=True)
    io_in = [{"name": "input", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    io_out = [{"name": "logits", "shape": [1, 8, 16, 16], "dtype": "float32"}]
    meta = engine_metadata(
        config=cfg, trt_version="10.3.0", gpu=GPU, inputs=io_in, outputs=io_out,
        onnx_path=Path("m.onnx"), onnx_sha256="ab" * 32, build_seconds=1.23456,
        build_warnings=["w"], flags=["FP16", "SPARSE_WEIGHTS"],
        timestamp="2025-01-01T00:00:00+00:00",
    )  # fmt: skip
    assert meta == {
        "tensorrt_version": "10.3.0",
        "gpu": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "precision": "fp16",
        "sparse": True,
        "workspace_mb": 512,
        "builder_flags": ["FP16", "SPARSE_WEIGHTS"],
        "config": cfg.to_dict(),
        "inputs": io_in,
        "outputs": io_out,
        "onnx": "m.onnx",
        "onnx_sha256": "ab" * 32,
        "build_seconds": 1.235,
        "timestamp": "2025-01-01T00:00:00+00:00",
        "warnings": ["w"],
    }
    unknown = engine_metadata(
        config=cfg, trt_version="10.3.0", gpu=None, inputs=[], outputs=[], onnx_path="m.onnx",
        onnx_sha256="0", build_seconds=0.0, build_warnings=[], flags=[],
    )  # fmt: skip
    assert unknown["gpu"] is None and unknown["compute_capability"] is None
    assert unknown["timestamp"].endswith("+00:00")


# -- optional imports -----------------------------------------------------------------
def test_require_tensorrt_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    with pytest.raises(DeepLSPError) as e:
        require_tensorrt()
    msg = one_line(e)
    assert msg.startswith("TensorRT is not importable")
    assert "pip install 'deeplsp[tensorrt]'" in msg and "sudo apt install nvidia-jetpack" in msg
    fake = types.ModuleType("tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert require_tensorrt() is fake


def test_require_pycuda_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(DeepLSPError) as e:
        require_pycuda()
    assert "pycuda is not importable" in one_line(e) and "deeplsp[tensorrt]" in str(e.value)


def test_build_engine_fails_in_one_line_without_tensorrt_or_onnx(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(DeepLSPError) as e:
        build_engine(tmp_path / "missing.onnx", tmp_path / "m.engine", EngineConfig())
    assert "cannot read ONNX file" in one_line(e)
    onnx_path = conv_onnx(tmp_path / "m.onnx")
    with pytest.raises(DeepLSPError, match="TensorRT is not importable"):
        build_engine(onnx_path, tmp_path / "m.engine", EngineConfig())
    assert not (tmp_path / "m.engine").exists()


# -- the build's orchestration against a fake TensorRT ---------------------------------
class _Severity:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)


class _ILogger:
    Severity = _Severity

    def __init__(self) -> None:
        pass


class _Tensor:
    def __init__(self, name, shape, dtype=np.float32):
        self.name, self.shape, self.dtype = name, shape, dtype


class _Network:
    def __init__(self):
        self.inputs, self.outputs = [], []

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


class _ParserError:
    desc = staticmethod(lambda: "No importer registered for op: Foo")
    node = staticmethod(lambda: 2)
    node_name = staticmethod(lambda: "foo_node")
    node_operator = staticmethod(lambda: "Foo")


class _Parser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse(self, data, path):
        if data.startswith(b"bad"):
            self.errors = [_ParserError(), _ParserError()]
            return False
        batch = -1 if b"dynamic" in data else 1
        self.network.inputs = [_Tensor("input", (batch, 3, 16, 16))]
        self.network.outputs = [_Tensor("logits", (batch, 8, 16, 16))]
        return True

    num_errors = property(lambda self: len(self.errors))

    def get_error(self, i):
        return self.errors[i]


class _TimingCache:
    def __init__(self, data):
        self.data = bytes(data)

    def serialize(self):
        return self.data + b"+new"


class _BuilderConfig:
    def __init__(self):
        self.flags, self.pools, self.timing = [], {}, None
        self.builder_optimization_level = 3
        self.int8_calibrator = None

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def set_flag(self, flag):
        self.flags.append(flag)

    def create_timing_cache(self, data):
        return _TimingCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.timing = cache
        return not cache.data.startswith(b"stale")

    def get_timing_cache(self):
        return self.timing


class _Builder:
    platform_has_fast_fp16 = False
    platform_has_fast_int8 = True
    last_config = None

    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags):
        assert flags == 0
        return _Network()

    def create_builder_config(self):
        _Builder.last_config = _BuilderConfig()
        return _Builder.last_config

    def build_serialized_network(self, network, config):
        if config.pools["WORKSPACE"] <= 1 << 20:
            self.logger.log(_Severity.ERROR, "insufficient workspace\ndetails")
            return None
        cal = config.int8_calibrator
        if cal is not None and cal.read_calibration_cache() is None:
            assert cal.get_batch_size() == 1
            while (ptrs := cal.get_batch(["input"])) is not None:
                self.calibrated.append(_FakeCuda.memory[ptrs[0]])
            cal.write_calibration_cache(memoryview(b"SCALES"))
        return b"ENGINE:" + ",".join(config.flags).encode()

    calibrated: list = []


class _FakeCuda:
    """pycuda.driver as the int8 build uses it: the primary context and one buffer."""

    memory: dict = {}
    events: list = []

    class Device:
        def __init__(self, index):
            self.index = index

        def retain_primary_context(self):
            ctx = types.SimpleNamespace()
            ctx.push = lambda: _FakeCuda.events.append("push")
            ctx.pop = lambda: _FakeCuda.events.append("pop")
            return ctx

    class _Alloc:
        def __init__(self, ptr):
            self.ptr = ptr

        def __int__(self):
            return self.ptr

        def free(self):
            _FakeCuda.events.append("free")

    @staticmethod
    def init():
        _FakeCuda.events.append("init")

    @staticmethod
    def mem_alloc(nbytes):
        return _FakeCuda._Alloc(1000 + nbytes)

    @staticmethod
    def memcpy_htod(dest, src):
        _FakeCuda.memory[int(dest)] = np.array(src, copy=True)


class _Calibrator2:
    def __init__(self):
        _FakeCuda.events.append("calibrator base initialised")


def _fake_trt() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        __version__="10.3.0",
        ILogger=_ILogger,
        Builder=_Builder,
        OnnxParser=_Parser,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        BuilderFlag=types.SimpleNamespace(FP16="FP16", INT8="INT8", SPARSE_WEIGHTS="SPARSE"),
        IInt8EntropyCalibrator2=_Calibrator2,
        nptype=lambda dt: dt,
    )


@pytest.fixture
def fake_trt(monkeypatch):
    monkeypatch.setattr(te, "require_tensorrt", _fake_trt)
    monkeypatch.setattr(te, "read_gpu", lambda index=0: dict(GPU))


def test_build_engine_writes_engine_metadata_and_timing_cache(tmp_path, fake_trt):
    onnx_path = conv_onnx(tmp_path / "m.onnx")
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"old")
    cfg = EngineConfig(precision="fp16", workspace_mb=64, sparse=True, timing_cache=timing,
                       builder_optimization_level=4)  # fmt: skip
    engine = tmp_path / "out" / "m.engine"
    meta = build_engine(onnx_path, engine, cfg)
    assert engine.read_bytes() == b"ENGINE:FP16,SPARSE"
    assert json.loads(metadata_path(engine).read_text()) == meta
    assert meta["inputs"] == [{"name": "input", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    assert meta["outputs"][0]["shape"] == [1, 8, 16, 16]
    assert meta["builder_flags"] == ["FP16", "SPARSE_WEIGHTS"]
    assert meta["gpu"] == GPU["name"] and meta["tensorrt_version"] == "10.3.0"
    assert meta["onnx_sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert any("platform_has_fast_fp16 is False" in w for w in meta["warnings"])  # not an error
    tc = _Builder.last_config
    assert tc.pools == {"WORKSPACE": 64 << 20} and tc.builder_optimization_level == 4
    assert timing.read_bytes() == b"old+new"  # read, then written back
    assert sorted(p.name for p in engine.parent.iterdir()) == ["m.engine", "m.engine.json"]


def test_build_engine_restarts_a_stale_timing_cache(tmp_path, fake_trt):
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"stale")
    cfg = EngineConfig(precision="fp32", timing_cache=timing)
    meta = build_engine(conv_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", cfg)
    assert any("restarted" in w for w in meta["warnings"])
    assert timing.read_bytes() == b"+new"
    assert meta["builder_flags"] == []


def test_build_engine_failures_are_one_line_and_leave_no_files(tmp_path, fake_trt):
    engine = tmp_path / "m.engine"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"bad proto")
    with pytest.raises(DeepLSPError) as e:
        build_engine(bad, engine, EngineConfig())
    assert one_line(e) == (
        f"TensorRT cannot parse {bad} at node 2 'foo_node' (Foo): "
        "No importer registered for op: Foo (+1 more)"
    )
    dyn = tmp_path / "dyn.onnx"
    dyn.write_bytes(b"dynamic")
    with pytest.raises(DeepLSPError, match="dynamic shape"):
        build_engine(dyn, engine, EngineConfig())
    with pytest.raises(DeepLSPError) as e:  # the fake fails at 1 MiB of workspace
        build_engine(conv_onnx(tmp_path / "m.onnx"), engine, EngineConfig(workspace_mb=1))
    assert one_line(e).endswith(": insufficient workspace")
    with pytest.raises(DeepLSPError, match="needs calibration data"):
        build_engine(tmp_path / "m.onnx", engine, EngineConfig(precision="int8"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "dyn.onnx", "m.onnx"]


def test_int8_build_feeds_batches_in_the_primary_context_and_writes_the_cache(
    tmp_path, fake_trt, monkeypatch
):
    monkeypatch.setattr(te, "require_pycuda", lambda: _FakeCuda)
    _FakeCuda.events.clear()
    _Builder.calibrated.clear()
    data = [np.full((1, 3, 16, 16), i, np.float32) for i in range(3)]
    cache = tmp_path / "calib.cache"
    cfg = EngineConfig(precision="int8", calibration_cache=cache)
    meta = build_engine(conv_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", cfg, data)
    assert meta["builder_flags"] == ["INT8", "FP16"]
    assert [float(b.mean()) for b in _Builder.calibrated] == [0.0, 1.0, 2.0]
    assert cache.read_bytes() == b"SCALES"
    assert _FakeCuda.events == ["init", "push", "calibrator base initialised", "free", "pop"]
    # A second build reads the scales from the cache; no data needed, none fed.
    _Builder.calibrated.clear()
    build_engine(tmp_path / "m.onnx", tmp_path / "m2.engine", cfg)
    assert (
        _Builder.calibrated == [] and (tmp_path / "m2.engine").read_bytes() == b"ENGINE:INT8,FP16"
    )
    with pytest.raises(DeepLSPError, match=r"batch 0 has shape \(3, 16, 16\)"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m3.engine", cfg, [np.zeros((3, 16, 16))])
    assert _FakeCuda.events[-1] == "pop"  # popped on failure too


# -- real TensorRT ----------------------------------------------------------------------
@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_build_writes_engine_and_metadata(tmp_path, precision):
    onnx_path = conv_onnx(tmp_path / "m.onnx")
    timing = tmp_path / "timing.cache"
    cfg = EngineConfig(precision=precision, workspace_mb=256, timing_cache=timing)
    engine = tmp_path / "m.engine"
    meta = build_engine(onnx_path, engine, cfg)
    assert engine.stat().st_size > 0 and timing.stat().st_size > 0
    assert json.loads(metadata_path(engine).read_text()) == meta
    assert meta["precision"] == precision and meta["build_seconds"] > 0
    assert meta["inputs"] == [{"name": "input", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    assert meta["outputs"] == [{"name": "logits", "shape": [1, 8, 16, 16], "dtype": "float32"}]
    assert meta["tensorrt_version"] == require_tensorrt().__version__
    assert meta["gpu"] and meta["compute_capability"]
    again = build_engine(onnx_path, tmp_path / "m2.engine", cfg)  # reuses the timing cache
    assert not any("restarted" in w for w in again["warnings"])


@pytest.mark.trt
@pytest.mark.gpu
def test_real_parse_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not an ONNX protobuf")
    with pytest.raises(DeepLSPError) as e:
        build_engine(bad, tmp_path / "m.engine", EngineConfig(precision="fp32"))
    assert one_line(e).startswith(f"TensorRT cannot parse {bad}")
    assert not (tmp_path / "m.engine").exists()


@pytest.mark.trt
@pytest.mark.gpu
def test_real_int8_build_with_calibration(tmp_path):
    if not hasattr(require_tensorrt(), "IInt8EntropyCalibrator2"):
        pytest.skip("this TensorRT has no implicit INT8 calibration (TensorRT 11+)")
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(4)]
    cache = tmp_path / "calib.cache"
    cfg = EngineConfig(precision="int8", workspace_mb=256, calibration_cache=cache)
    meta = build_engine(conv_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", cfg, data)
    assert meta["builder_flags"] == ["INT8", "FP16"] and cache.stat().st_size > 0
    # With the cache written, no data is needed to build again.
    build_engine(tmp_path / "m.onnx", tmp_path / "m2.engine", cfg)
    assert (tmp_path / "m2.engine").stat().st_size > 0
