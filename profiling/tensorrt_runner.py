"""TensorRT runner: the latency backend of GPU and Jetson devices.

Compute is timed with CUDA events around `execute_async_v3` alone; the host->device and
device->host copies are timed apart with their own events and reported as
`LatencyStats.copy_median`, so a pruned model's gain is not hidden behind PCIe or
unified-memory transfers. The CUDA context is created and destroyed explicitly (no
pycuda.autoinit), so activating and deactivating runners in one process is safe.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deeplsp.errors import DeepLSPError, first_line
from devices.nvidia import read_gpu
from export.tensorrt_export import (
    EngineConfig,
    build_engine,
    check_fixed_shapes,
    engine_cache_key,
    gpu_label,
    metadata_path,
    require_pycuda,
    require_tensorrt,
)
from profiling.runner import LatencyStats, Runner

DEFAULT_CACHE_DIR = Path("~/.cache/deeplsp/engines")


def _engine_precision(engine: str | Path | bytes) -> str | None:
    """The precision recorded in an engine file's metadata JSON, if there is one."""
    if isinstance(engine, bytes):
        return None
    try:
        return json.loads(metadata_path(engine).read_text()).get("precision")
    except (OSError, ValueError, AttributeError):
        return None


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine (a file or its bytes) on one CUDA device."""

    name = "tensorrt"

    def __init__(
        self,
        engine: str | Path | bytes,
        device_index: int = 0,
        precision: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(device_index, bool) or not isinstance(device_index, int) or device_index < 0:
            raise DeepLSPError(f"device_index must be an integer >= 0 (got {device_index!r})")
        self.engine_source = engine
        self.device_index = device_index
        self.precision = precision or _engine_precision(engine)
        self._reset()

    def _reset(self) -> None:
        self._trt: Any = None
        self._cuda: Any = None
        self._ctx: Any = None
        self._logger: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._inputs: dict[str, tuple[np.ndarray, Any]] = {}  # name -> (pinned host, device)
        self._outputs: dict[str, tuple[np.ndarray, Any]] = {}
        self._device_name: str | None = None
        self._compute_capability: str | None = None

    # -- lifecycle ---------------------------------------------------------------
    def _activate_impl(self) -> None:
        trt = require_tensorrt()
        cuda = require_pycuda()
        data = self._engine_bytes()
        cuda.init()
        device = cuda.Device(self.device_index)
        self._trt, self._cuda = trt, cuda
        self._ctx = device.make_context()
        try:
            self._device_name = device.name()
            major, minor = device.compute_capability()
            self._compute_capability = f"{major}.{minor}"
            self._load(data)
        except BaseException:
            self._release()
            raise

    def _engine_bytes(self) -> bytes:
        if isinstance(self.engine_source, bytes):
            return self.engine_source
        try:
            return Path(self.engine_source).read_bytes()
        except OSError as exc:
            raise DeepLSPError(
                f"cannot read TensorRT engine {self.engine_source}: {first_line(exc)}"
            ) from exc

    def _load(self, data: bytes) -> None:
        """Deserialize, check shapes, and allocate one pinned host + device buffer per tensor."""
        trt, cuda = self._trt, self._cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self._engine = runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            what = "engine bytes" if isinstance(self.engine_source, bytes) else self.engine_source
            raise DeepLSPError(
                f"TensorRT {trt.__version__} cannot deserialize {what}; engines only load on "
                "the TensorRT version and GPU they were built with, so rebuild it here"
            )
        self._runtime = runtime  # keep alive for as long as the engine
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        shapes = {n: tuple(int(d) for d in self._engine.get_tensor_shape(n)) for n in names}
        check_fixed_shapes(shapes)
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise DeepLSPError("TensorRT could not create an execution context (out of memory?)")
        self._stream = cuda.Stream()
        for n in names:
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(n)))
            host = cuda.pagelocked_empty(shapes[n], dtype)
            device = cuda.mem_alloc(max(host.nbytes, 1))
            self._context.set_tensor_address(n, int(device))
            is_input = self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
            (self._inputs if is_input else self._outputs)[n] = (host, device)

    def _deactivate_impl(self) -> None:
        self._release()

    def _release(self) -> None:
        """Free buffers and TensorRT objects inside our context, then pop and detach it."""
        try:
            for host, device in [*self._inputs.values(), *self._outputs.values()]:
                device.free()
                free_pinned = getattr(host.base, "free", None)  # pycuda's pinned allocation
                if free_pinned is not None:
                    free_pinned()
            self._inputs, self._outputs = {}, {}
            self._context = self._engine = self._runtime = self._stream = None
        finally:
            if self._ctx is not None:
                self._ctx.pop()
                self._ctx.detach()
            self._reset()

    # -- inference ---------------------------------------------------------------
    def _input_specs_impl(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {n: (host.shape, host.dtype) for n, (host, _) in self._inputs.items()}

    def _stage(self, feed: dict[str, np.ndarray]) -> None:
        """Copy the feed into the pinned host buffers (host work, not timed)."""
        missing = sorted(set(self._inputs) - set(feed))
        if missing:
            raise DeepLSPError(f"missing input(s) {', '.join(missing)} for the TensorRT engine")
        for n, (host, _) in self._inputs.items():
            arr = np.asarray(feed[n])
            if arr.shape != host.shape:
                raise DeepLSPError(
                    f"input {n!r} has shape {arr.shape}; the engine expects {host.shape}"
                )
            np.copyto(host, arr, casting="same_kind")

    def _h2d(self) -> None:
        for host, device in self._inputs.values():
            self._cuda.memcpy_htod_async(device, host, self._stream)

    def _execute(self) -> None:
        if not self._context.execute_async_v3(stream_handle=self._stream.handle):
            raise DeepLSPError("TensorRT execute_async_v3 failed (see the TensorRT log)")

    def _d2h(self) -> None:
        for host, device in self._outputs.values():
            self._cuda.memcpy_dtoh_async(host, device, self._stream)

    def _infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._stage(feed)
        self._h2d()
        self._execute()
        self._d2h()
        self._stream.synchronize()
        return {n: host.copy() for n, (host, _) in self._outputs.items()}

    def _timed_runs_impl(
        self, feed: dict[str, np.ndarray], iters: int
    ) -> tuple[list[float], list[float]]:
        """Per run: compute ms (events around execute_async_v3) and copy ms (H2D + D2H)."""
        self._stage(feed)
        start, before_exec, after_exec, end = (self._cuda.Event() for _ in range(4))
        compute, copies = [], []
        for _ in range(iters):
            start.record(self._stream)
            self._h2d()
            before_exec.record(self._stream)
            self._execute()
            after_exec.record(self._stream)
            self._d2h()
            end.record(self._stream)
            end.synchronize()
            compute.append(before_exec.time_till(after_exec))
            copies.append(start.time_till(before_exec) + after_exec.time_till(end))
        return compute, copies

    def settings(self) -> dict:
        trt = self._trt or require_tensorrt()
        return {
            "runtime": "tensorrt",
            "version": str(trt.__version__),
            "precision": self.precision,
            "device": self._device_name,
            "compute_capability": self._compute_capability,
            "device_index": self.device_index,
            "timing": "cuda events; copies apart",
        }


def middle_by_median(runs: Sequence[LatencyStats]) -> LatencyStats:
    """The run whose median is the middle one (as profiling.isolated does for ONNX Runtime)."""
    if not runs:
        raise DeepLSPError("no latency runs to choose from")
    ordered = sorted(runs, key=lambda s: s.median)
    return ordered[len(ordered) // 2]


def measure_onnx_tensorrt(
    onnx_path: str | Path,
    config: EngineConfig,
    warmup: int,
    iters: int,
    repeats: int = 1,
    cache_dir: Path | None = None,
    calibration: Sequence[np.ndarray] | None = None,
) -> LatencyStats:
    """Latency of an ONNX file as a TensorRT engine, built once and cached by content.

    The engine is reused from `cache_dir` (default ~/.cache/deeplsp/engines) when the ONNX
    bytes, config, TensorRT version and GPU match. With `repeats` > 1 the repeat whose
    median is the middle one is returned: a burst of load shifts a whole window.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise DeepLSPError(f"repeats must be an integer >= 1 (got {repeats!r})")
    onnx_path = Path(onnx_path)
    try:
        onnx_bytes = onnx_path.read_bytes()
    except OSError as exc:
        raise DeepLSPError(f"cannot read ONNX file {onnx_path}: {first_line(exc)}") from exc
    trt = require_tensorrt()
    key = engine_cache_key(onnx_bytes, config, str(trt.__version__), gpu_label(read_gpu()))
    engine_path = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / f"{key}.engine"
    if not engine_path.is_file():
        build_engine(onnx_path, engine_path, config, calibration)
    with TensorRTRunner(engine_path, precision=config.precision) as runner:
        runs = [runner.measure(warmup=warmup, iters=iters) for _ in range(repeats)]
    return middle_by_median(runs)
