"""Build TensorRT engines from ONNX files (TensorRT 10 Python API).

The TensorRT and CUDA calls are kept in a few small functions (`_build_in_context`,
`_make_calibrator`, `_error_logger`, `_load_timing_cache`); everything around them
(configuration checks, error messages, metadata, cache keys) is plain Python, tested
without a GPU.
tensorrt and pycuda are imported only when needed, so the CLI starts without them.

TensorRT 11 removed weak typing (BuilderFlag.FP16/INT8) and implicit INT8 calibration;
on it only "fp32" builds work here, and the others fail with a one-line reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from deeplsp.atomic import atomic_path, write_json
from deeplsp.errors import DeepLSPError, first_line
from devices.nvidia import read_gpu

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
OPT_LEVELS = range(0, 6)  # TensorRT's builder optimisation levels, 0..5 (default 3)
INSTALL_HINT = (
    "pip install 'deeplsp[tensorrt]' on an x86 machine with a CUDA GPU; "
    "on a Jetson TensorRT comes with JetPack (sudo apt install nvidia-jetpack)"
)


# -- optional imports ------------------------------------------------------------
def require_tensorrt() -> ModuleType:
    """The `tensorrt` module, or a one-line DeepLSPError saying how to install it."""
    try:
        import tensorrt
    except ImportError as exc:  # also a missing libnvinfer.so, which raises ImportError
        raise DeepLSPError(
            f"TensorRT is not importable ({first_line(exc)}): {INSTALL_HINT}"
        ) from exc
    return tensorrt


def require_pycuda() -> ModuleType:
    """`pycuda.driver` (device memory, streams, events), or a one-line DeepLSPError."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise DeepLSPError(
            f"pycuda is not importable ({first_line(exc)}): pip install 'deeplsp[tensorrt]' "
            "(it compiles against the CUDA toolkit; on a Jetson JetPack provides it: "
            "sudo apt install nvidia-jetpack)"
        ) from exc
    return cuda


# -- configuration ---------------------------------------------------------------
def _as_path(value: object, field_name: str) -> Path | None:
    if value is None:
        return None
    if isinstance(value, str | Path) and str(value):
        return Path(value)
    raise DeepLSPError(f"{field_name} must be a file path or None (got {value!r})")


@dataclass(frozen=True)
class EngineConfig:
    """How to build one engine; recorded in its metadata so the build is reproducible."""

    precision: str = "fp16"
    workspace_mb: int = 1024
    timing_cache: Path | None = None  # read if present, written back after the build
    sparse: bool = False  # BuilderFlag.SPARSE_WEIGHTS, for 2:4 sparse weights
    calibration_cache: Path | None = None  # int8 only
    builder_optimization_level: int | None = None  # None: TensorRT's default (3)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise DeepLSPError(
                f"precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})"
            )
        ws = self.workspace_mb
        if isinstance(ws, bool) or not isinstance(ws, int) or ws < 1:
            raise DeepLSPError(f"workspace_mb must be a positive integer of MiB (got {ws!r})")
        if not isinstance(self.sparse, bool):
            raise DeepLSPError(f"sparse must be True or False (got {self.sparse!r})")
        level = self.builder_optimization_level
        if level is not None and (
            isinstance(level, bool) or not isinstance(level, int) or level not in OPT_LEVELS
        ):
            raise DeepLSPError(
                f"builder_optimization_level must be an integer 0..5 or None (got {level!r})"
            )
        # Frozen: normalise str paths to Path through object.__setattr__.
        object.__setattr__(self, "timing_cache", _as_path(self.timing_cache, "timing_cache"))
        calib = _as_path(self.calibration_cache, "calibration_cache")
        if calib is not None and self.precision != "int8":
            raise DeepLSPError(
                f"calibration_cache applies only to precision 'int8' (got {self.precision!r})"
            )
        object.__setattr__(self, "calibration_cache", calib)

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "workspace_mb": self.workspace_mb,
            "timing_cache": str(self.timing_cache) if self.timing_cache else None,
            "sparse": self.sparse,
            "calibration_cache": str(self.calibration_cache) if self.calibration_cache else None,
            "builder_optimization_level": self.builder_optimization_level,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineConfig:
        """Inverse of to_dict(), for rebuilding from a run's report; unknown keys are errors."""
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise DeepLSPError(f"unknown EngineConfig fields: {', '.join(unknown)}")
        return cls(**data)


def engine_cache_key(onnx_bytes: bytes, config: EngineConfig, trt_version: str, gpu: str) -> str:
    """sha256 hex naming the engine these inputs produce, for callers that cache engines.

    The timing cache path is left out: it speeds the build up but does not change what
    the engine computes. Calibration data is not an input either; it moves INT8 scales,
    not the kernels whose latency is cached.
    """
    fields = config.to_dict()
    fields.pop("timing_cache")
    payload = {
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "config": fields,
        "tensorrt": trt_version,
        "gpu": gpu,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def gpu_label(gpu: dict | None) -> str:
    """A GPU as one string for cache keys: "NVIDIA H100 80GB HBM3 (sm 9.0)"."""
    if not gpu or not gpu.get("name"):
        return "unknown GPU"
    return f"{gpu['name']} (sm {gpu.get('compute_capability') or '?'})"


def metadata_path(engine_path: str | Path) -> Path:
    """Where an engine's metadata lives: model.engine -> model.engine.json."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


# -- pure checks and formatting ----------------------------------------------------
def check_tensorrt_supports(trt: Any, config: EngineConfig) -> None:
    """Fail in one line when the installed TensorRT lacks what `config` needs.

    TensorRT 11 removed BuilderFlag.FP16/INT8 and the implicit-quantisation calibrators.
    """
    version = getattr(trt, "__version__", "?")
    flags = getattr(trt, "BuilderFlag", None)
    if config.precision == "int8" and not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise DeepLSPError(
            f"TensorRT {version} has no IInt8EntropyCalibrator2 (implicit INT8 calibration was "
            "removed in TensorRT 11): use precision 'fp16' with TensorRT 10, or an ONNX "
            "quantised with Q/DQ nodes"
        )
    needed = {"fp16": ["FP16"], "int8": ["INT8", "FP16"]}.get(config.precision, [])
    if config.sparse:
        needed.append("SPARSE_WEIGHTS")
    missing = [name for name in needed if not hasattr(flags, name)]
    if missing:
        raise DeepLSPError(
            f"TensorRT {version} has no BuilderFlag.{missing[0]} (weak typing was removed in "
            f"TensorRT 11): build precision 'fp32' from an ONNX already in the wanted "
            "precision, or use TensorRT 10"
        )


def check_fixed_shapes(shapes: dict[str, Sequence[int]]) -> None:
    """Engines here have no optimisation profiles, so every I/O shape must be static."""
    for name, shape in shapes.items():
        if any(int(d) < 0 for d in shape):
            raise DeepLSPError(
                f"tensor {name!r} has a dynamic shape {tuple(int(d) for d in shape)}; "
                "export the ONNX with a fixed input shape"
            )


def format_parser_errors(onnx_path: str | Path, errors: Sequence[dict[str, Any]]) -> str:
    """One line for the ONNX parser's errors: the first in full, and how many more."""
    if not errors:
        return f"TensorRT cannot parse {onnx_path} (the parser reported no error)"
    e = errors[0]
    where = []
    if e.get("node") is not None and int(e["node"]) >= 0:
        where.append(f"node {e['node']}")
    if e.get("node_name"):
        where.append(repr(e["node_name"]))
    if e.get("operator"):
        where.append(f"({e['operator']})")
    desc = first_line(RuntimeError(e.get("desc") or "unknown error"))
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    at = f" at {' '.join(where)}" if where else ""
    return f"TensorRT cannot parse {onnx_path}{at}: {desc}{more}"


def check_calibration(
    calibration: Sequence[np.ndarray] | None,
    input_shapes: dict[str, tuple[int, ...]],
    calibration_cache: Path | None,
) -> list[np.ndarray]:
    """The int8 calibration batches as contiguous float32 arrays, checked against the input.

    Without batches an existing calibration cache file suffices (TensorRT reads the scales
    from it); with neither there is nothing to calibrate from.
    """
    have_cache = calibration_cache is not None and calibration_cache.is_file()
    if not calibration:
        if have_cache:
            return []
        raise DeepLSPError(
            "precision 'int8' needs calibration data (a list of float32 arrays of the input's "
            "shape) or an existing calibration_cache file"
        )
    if len(input_shapes) != 1:
        raise DeepLSPError(
            f"int8 calibration supports one-input networks; this one has {len(input_shapes)} "
            f"inputs ({', '.join(input_shapes)})"
        )
    name, shape = next(iter(input_shapes.items()))
    batches = []
    for i, arr in enumerate(calibration):
        arr = np.asarray(arr)
        if tuple(arr.shape) != tuple(shape):
            raise DeepLSPError(
                f"calibration batch {i} has shape {tuple(arr.shape)}, but input {name!r} "
                f"is {tuple(shape)}"
            )
        if not np.issubdtype(arr.dtype, np.floating):
            raise DeepLSPError(f"calibration batch {i} has dtype {arr.dtype}; pass float32 data")
        batches.append(np.ascontiguousarray(arr, dtype=np.float32))
    return batches


def precision_warnings(precision: str, fast_fp16: bool | None, fast_int8: bool | None) -> list[str]:
    """Warnings (not errors) when the GPU lacks fast kernels for the requested precision."""
    out = []
    if precision in ("fp16", "int8") and fast_fp16 is False:
        out.append(
            f"{precision} requested but the GPU has no fast fp16 "
            "(builder.platform_has_fast_fp16 is False); TensorRT may choose fp32 kernels"
        )
    if precision == "int8" and fast_int8 is False:
        out.append(
            "int8 requested but the GPU has no fast int8 "
            "(builder.platform_has_fast_int8 is False); TensorRT may choose other kernels"
        )
    return out


def engine_metadata(
    *,
    config: EngineConfig,
    trt_version: str,
    gpu: dict | None,
    inputs: list[dict],
    outputs: list[dict],
    onnx_path: str | Path,
    onnx_sha256: str,
    build_seconds: float,
    build_warnings: list[str],
    flags: list[str],
    timestamp: str | None = None,
) -> dict[str, Any]:
    """The JSON written next to an engine: enough to tell whether it can be reused."""
    gpu = gpu or {}
    return {
        "tensorrt_version": trt_version,
        "gpu": gpu.get("name"),
        "compute_capability": gpu.get("compute_capability"),
        "precision": config.precision,
        "sparse": config.sparse,
        "workspace_mb": config.workspace_mb,
        "builder_flags": list(flags),
        "config": config.to_dict(),
        "inputs": inputs,
        "outputs": outputs,
        "onnx": str(onnx_path),
        "onnx_sha256": onnx_sha256,
        "build_seconds": round(float(build_seconds), 3),
        "timestamp": timestamp or datetime.now(UTC).isoformat(timespec="seconds"),
        "warnings": list(build_warnings),
    }


# -- the thin TensorRT / CUDA layer ---------------------------------------------------
def _error_logger(trt: Any) -> Any:
    """A trt.ILogger that keeps error messages (for one-line failures) and forwards the rest."""
    sev = trt.ILogger.Severity
    levels = {
        sev.INTERNAL_ERROR: logging.ERROR,
        sev.ERROR: logging.ERROR,
        sev.WARNING: logging.WARNING,
        sev.INFO: logging.DEBUG,
        sev.VERBOSE: logging.DEBUG,
    }

    class _ErrorLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # pybind11 trampolines need the base initialised
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.DEBUG)
            if level >= logging.ERROR:
                self.errors.append(msg)
            log.log(level, "TensorRT: %s", msg)

    return _ErrorLogger()


def _dtype_name(trt: Any, dtype: Any) -> str:
    try:
        return np.dtype(trt.nptype(dtype)).name
    except TypeError:  # no numpy equivalent (bf16, fp8, int4)
        return str(dtype)


def _tensor_info(trt: Any, tensor: Any) -> dict:
    return {
        "name": tensor.name,
        "shape": [int(d) for d in tensor.shape],
        "dtype": _dtype_name(trt, tensor.dtype),
    }


def _make_calibrator(trt: Any, cuda: Any, batches: list[np.ndarray], cache: Path | None) -> Any:
    """An IInt8EntropyCalibrator2 feeding `batches` through one pycuda device buffer.

    Must be created, used and freed while a CUDA context is current.
    """

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = batches
            self.index = 0
            self.device = cuda.mem_alloc(batches[0].nbytes) if batches else None

        def get_batch_size(self) -> int:
            return 1  # explicit batch: the batch dimension is part of the input shape

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index >= len(self.batches):
                return None
            cuda.memcpy_htod(self.device, self.batches[self.index])
            self.index += 1
            return [int(self.device)]

        def read_calibration_cache(self) -> bytes | None:
            if cache is not None and cache.is_file() and cache.stat().st_size:
                return cache.read_bytes()
            return None

        def write_calibration_cache(self, data: Any) -> None:
            if cache is not None:
                with atomic_path(cache) as tmp:
                    tmp.write_bytes(bytes(data))

        def free(self) -> None:
            if self.device is not None:
                self.device.free()
                self.device = None

    return _Calibrator()


def _load_timing_cache(trt_config: Any, path: Path | None, notes: list[str]) -> Any:
    """Attach the timing cache at `path` (or a fresh one) to the builder config."""
    if path is None:
        return None
    previous = path.read_bytes() if path.is_file() else b""
    if previous:
        try:
            cache = trt_config.create_timing_cache(previous)
        except Exception:  # a corrupt file; start a new cache rather than fail the build
            cache = None
        if cache is not None and trt_config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
        notes.append(f"timing cache {path} is unreadable or from another TensorRT/GPU; restarted")
    cache = trt_config.create_timing_cache(b"")
    trt_config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _build_serialized(
    trt: Any, onnx_bytes: bytes, onnx_path: Path, config: EngineConfig, calibration: Any
) -> tuple[Any, dict]:
    """Parse, configure and build. Returns (serialized engine, facts for the metadata).

    INT8 calibration copies batches into pycuda memory, which must live in the context
    TensorRT runs in: the device's primary context (the CUDA runtime's), made current
    before any TensorRT object exists and popped after the build.
    """
    if config.precision != "int8":
        return _build_in_context(trt, None, onnx_bytes, onnx_path, config, calibration)
    cuda = require_pycuda()
    cuda.init()
    ctx = cuda.Device(0).retain_primary_context()
    ctx.push()
    try:
        return _build_in_context(trt, cuda, onnx_bytes, onnx_path, config, calibration)
    finally:
        ctx.pop()


def _parser_error_fields(err: Any) -> dict:
    return {
        "desc": err.desc(),
        "node": err.node(),
        "node_name": err.node_name() if hasattr(err, "node_name") else None,  # TensorRT >= 9
        "operator": err.node_operator() if hasattr(err, "node_operator") else None,
    }


def _build_in_context(
    trt: Any,
    cuda: Any,
    onnx_bytes: bytes,
    onnx_path: Path,
    config: EngineConfig,
    calibration: Any,
) -> tuple[Any, dict]:
    logger = _error_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes, str(onnx_path)):  # the path locates external weights
        errors = [_parser_error_fields(parser.get_error(i)) for i in range(parser.num_errors)]
        raise DeepLSPError(format_parser_errors(onnx_path, errors))

    inputs = [_tensor_info(trt, network.get_input(i)) for i in range(network.num_inputs)]
    outputs = [_tensor_info(trt, network.get_output(i)) for i in range(network.num_outputs)]
    check_fixed_shapes({t["name"]: t["shape"] for t in inputs})

    tc = builder.create_builder_config()
    tc.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
    if config.builder_optimization_level is not None:
        tc.builder_optimization_level = config.builder_optimization_level
    with warnings.catch_warnings():  # platform_has_fast_* are deprecated since TensorRT 10.5
        warnings.simplefilter("ignore", DeprecationWarning)
        fast_fp16 = getattr(builder, "platform_has_fast_fp16", None)
        fast_int8 = getattr(builder, "platform_has_fast_int8", None)
    notes = precision_warnings(config.precision, fast_fp16, fast_int8)
    # int8 keeps fp16 on for the layers TensorRT cannot run in int8 (like trtexec --best).
    flags = {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"]}[config.precision]
    if config.sparse:
        flags.append("SPARSE_WEIGHTS")
    for flag in flags:
        tc.set_flag(getattr(trt.BuilderFlag, flag))
    timing_cache = _load_timing_cache(tc, config.timing_cache, notes)

    calibrator = None
    try:
        if config.precision == "int8":
            shapes = {t["name"]: tuple(t["shape"]) for t in inputs}
            batches = check_calibration(calibration, shapes, config.calibration_cache)
            calibrator = _make_calibrator(trt, cuda, batches, config.calibration_cache)
            with warnings.catch_warnings():  # deprecated since TensorRT 10.1
                warnings.simplefilter("ignore", DeprecationWarning)
                tc.int8_calibrator = calibrator
        serialized = builder.build_serialized_network(network, tc)
    finally:
        if calibrator is not None:
            calibrator.free()
    if serialized is None:
        why = first_line(RuntimeError(logger.errors[-1])) if logger.errors else "no reason given"
        raise DeepLSPError(f"TensorRT could not build an engine from {onnx_path}: {why}")
    if timing_cache is not None:
        with atomic_path(config.timing_cache) as tmp, open(tmp, "wb") as f:
            f.write(tc.get_timing_cache().serialize())
    facts = {"inputs": inputs, "outputs": outputs, "warnings": notes, "flags": flags}
    return serialized, facts


# -- public entry point -------------------------------------------------------------
def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    config: EngineConfig,
    calibration: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Build `engine_path` from `onnx_path` and write its metadata beside it (.engine.json).

    Both files are written atomically. Returns the metadata dict.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    try:
        onnx_bytes = onnx_path.read_bytes()
    except OSError as exc:
        raise DeepLSPError(f"cannot read ONNX file {onnx_path}: {first_line(exc)}") from exc
    trt = require_tensorrt()
    check_tensorrt_supports(trt, config)
    if config.precision == "int8" and not calibration:  # fail before the slow parse
        check_calibration(calibration, {}, config.calibration_cache)

    t0 = time.perf_counter()
    serialized, facts = _build_serialized(trt, onnx_bytes, onnx_path, config, calibration)
    build_seconds = time.perf_counter() - t0

    with atomic_path(engine_path) as tmp, open(tmp, "wb") as f:
        f.write(serialized)
    meta = engine_metadata(
        config=config,
        trt_version=str(trt.__version__),
        gpu=read_gpu(),
        inputs=facts["inputs"],
        outputs=facts["outputs"],
        onnx_path=onnx_path,
        onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        build_seconds=build_seconds,
        build_warnings=facts["warnings"],
        flags=facts["flags"],
    )
    write_json(metadata_path(engine_path), meta)
    for note in facts["warnings"]:
        log.warning("%s", note)
    return meta
