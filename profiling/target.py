"""A device as this process reaches it: every measurement, engine build and
fingerprint goes through here, so DeepLSP runs unchanged whether the device is this
machine or a Jetson behind `deeplsp agent serve` (`DeviceSpec.url` set).

Locally: ONNX Runtime files are timed in a child process (see profiling.isolated);
TensorRT devices build an engine from the ONNX file on this GPU and time it.
Remotely: the agent does the same on its device, with the same code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from deeplsp.errors import DeepLSPError
from devices import DeviceSpec
from devices import fingerprint as local_fingerprint
from profiling.runner import LatencyStats


@lru_cache(maxsize=8)
def _client_for(url: str, device_name: str):
    from devices.config import agent_token
    from profiling.remote import AgentClient

    return AgentClient(url, agent_token(device_name))


def client(device: DeviceSpec):
    """The agent client of a remote device (one per URL in this process)."""
    if device.url is None:
        raise DeepLSPError(f"device {device.name!r} is local; it has no agent URL")
    return _client_for(device.url, device.name)


@lru_cache(maxsize=8)
def _remote_info(url: str, device_name: str) -> dict:
    info = _client_for(url, device_name).info()
    served = info["device"]["name"]
    if served != device_name:
        raise DeepLSPError(
            f"the agent at {url} serves device {served!r}, not {device_name!r}; "
            f"use --device {served} or the URL of a {device_name} agent"
        )
    return info


def _agent_info(device: DeviceSpec) -> dict:
    """The agent's info, once it is known to serve `device` with the same settings: a
    latency measured with other settings than the ones asked for would be a wrong answer."""
    info = _remote_info(device.url, device.name)
    served = info["device"]
    wrong = [
        f"{k} {served[k]!r} (asked {getattr(device, k)!r})"
        for k in ("backend", "precision", "batch", "channel_multiple")
        if served[k] != getattr(device, k)
    ]
    cores = info["fingerprint"].get("cores")
    if device.threads is not None and cores != device.threads:
        wrong.append(f"{cores} threads (asked {device.threads}; start it with --threads)")
    if wrong:
        raise DeepLSPError(
            f"the agent at {device.url} measures {device.name} with {', '.join(wrong)}"
        )
    return info


def served_device(url: str) -> str:
    """The name of the device the agent at `url` serves."""
    from devices.config import check_url

    return _client_for(check_url(url), "").info()["device"]["name"]


def fingerprint(device: DeviceSpec) -> dict:
    """Hardware, runtime and settings that latencies on `device` depend on, with an id."""
    if device.url is not None:
        return dict(_agent_info(device)["fingerprint"])
    return local_fingerprint(device)


def engine_config(device: DeviceSpec, **overrides):
    """The TensorRT build settings of a TensorRT device: its precision and a timing cache
    shared by its builds (so rebuilding similar candidates is quick), with `overrides`
    (precision, workspace_mb, sparse, ...) on top."""
    from export.tensorrt_export import EngineConfig

    if device.backend != "tensorrt":
        raise DeepLSPError(
            f"device {device.name!r} runs {device.backend} and has no TensorRT engines; "
            "use a TensorRT device (gpu, jetson-orin, jetson-orin-nx, jetson-orin-nano)"
        )
    cache = Path.home() / ".cache" / "deeplsp" / f"timing-{device.name}.cache"
    settings = {"precision": device.precision, "timing_cache": cache}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return EngineConfig(**settings)


def measure_many(
    device: DeviceSpec,
    paths: Sequence[str | Path],
    warmup: int,
    iters: int,
    repeats: int = 1,
    kernels_except: Sequence[str] | None = None,
) -> Iterator[LatencyStats]:
    """Each ONNX file's latency on the device, in order, as soon as it is measured; with
    `kernels_except` (ONNX Runtime only), the kernel time of the nodes of other op types."""
    if kernels_except is not None and device.backend != "onnxruntime":
        raise DeepLSPError(f"device {device.name!r} runs {device.backend}: no kernel times")
    if device.url is not None:
        _agent_info(device)
        for path in paths:
            yield client(device).profile(
                Path(path), warmup, iters, repeats, kernels_except=kernels_except
            )
    elif device.backend == "onnxruntime":
        from profiling.isolated import measure_isolated_many

        yield from measure_isolated_many(
            paths, device.resolved_threads(), warmup, iters, repeats, kernels_except
        )
    elif device.backend == "tensorrt":
        from profiling.tensorrt_runner import measure_onnx_tensorrt

        for path in paths:
            yield measure_onnx_tensorrt(Path(path), engine_config(device), warmup, iters, repeats)
    else:
        raise DeepLSPError(f"device {device.name!r} has an unknown backend {device.backend!r}")


def layer_timing(device: DeviceSpec) -> str:
    """How `measure_layers` times a layer's file on `device`: "kernels" (ONNX Runtime's
    profiler, here or on the agent) or "file" (the whole file: TensorRT)."""
    return "kernels" if device.backend == "onnxruntime" else "file"


def measure_layers(
    device: DeviceSpec, paths: Sequence[str | Path], warmup: int, iters: int, harness: Sequence[str]
) -> Iterator[LatencyStats]:
    """Each one-layer file's latency, in order: with ONNX Runtime, the kernel time of its
    nodes except the op types in `harness` (the layer's layout conversions and sink, which
    it has only because it runs alone); with TensorRT the whole file (`layer_timing`)."""
    kernels_except = harness if layer_timing(device) == "kernels" else None
    yield from measure_many(device, paths, warmup, iters, kernels_except=kernels_except)


def measure(
    device: DeviceSpec, path: str | Path, warmup: int, iters: int, repeats: int = 3
) -> LatencyStats:
    """One ONNX file's latency: the middle of `repeats` timed windows."""
    return next(iter(measure_many(device, [path], warmup, iters, repeats)))


@dataclass(frozen=True)
class Relative:
    """A file's latency as a ratio to a reference timed alternately with it."""

    ratio: float  # median over rounds of file / reference around it
    ratios: list[float]
    stats: LatencyStats  # the file's middle window, as timed
    reference: LatencyStats  # the reference's middle window, as timed


def measure_relative(
    device: DeviceSpec,
    path: str | Path,
    reference: str | Path,
    warmup: int,
    iters: int,
    rounds: int = 5,
) -> Relative:
    """Time `reference` and `path` alternately in one measuring call (one process on the
    cpu device): R P R P ... R, `rounds` windows of `path`, each compared with the
    geometric mean of the reference windows either side of it, so a machine that slows
    down or speeds up steadily cancels out of every ratio.

    A slow spell of a shared machine slows both files alike, so the ratio holds where an
    absolute time does not: on this project's 2-core VM one model's ratio to a reference
    moved 4-11% between runs, its absolute median 10-18%
    (bench/results/latency_regress.md)."""
    if rounds < 1:
        raise DeepLSPError(f"rounds must be >= 1 (got {rounds})")
    runs = list(measure_many(device, [reference, path] * rounds + [reference], warmup, iters))
    ref, own = runs[0::2], runs[1::2]
    ratios = [own[i].median / (ref[i].median * ref[i + 1].median) ** 0.5 for i in range(rounds)]

    def middle(windows: list[LatencyStats]) -> LatencyStats:
        return sorted(windows, key=lambda s: s.median)[len(windows) // 2]

    return Relative(float(np.median(ratios)), ratios, middle(own), middle(ref))


def measure_engine(
    device: DeviceSpec, engine_path: str | Path, warmup: int, iters: int, repeats: int = 3
) -> LatencyStats:
    """A TensorRT engine file's latency (engines only run where they were built)."""
    engine_config(device)  # the error for non-TensorRT devices
    if device.url is not None:
        _agent_info(device)
        return client(device).profile(Path(engine_path), warmup, iters, repeats, kind="engine")
    from profiling.tensorrt_runner import TensorRTRunner

    runs = []
    with TensorRTRunner(Path(engine_path)) as runner:
        for _ in range(repeats):
            runs.append(runner.measure(warmup=warmup, iters=iters))
    return sorted(runs, key=lambda s: s.median)[len(runs) // 2]


def build_engine(
    device: DeviceSpec,
    onnx_path: str | Path,
    engine_path: str | Path,
    calibration: Sequence[np.ndarray] | None = None,
    config=None,
) -> dict:
    """Build the device's TensorRT engine for an ONNX file (on the device itself when it
    is remote); writes `engine_path` and its metadata JSON, returns the metadata.
    `config` (an EngineConfig) defaults to the device's `engine_config`."""
    config = config or engine_config(device)
    if device.url is not None:
        _agent_info(device)
        return client(device).build_engine(Path(onnx_path), Path(engine_path), config, calibration)
    from export.tensorrt_export import build_engine as build_local

    return build_local(Path(onnx_path), Path(engine_path), config, calibration)


def infer(
    device: DeviceSpec, path: str | Path, inputs: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run an ONNX file (or, on TensorRT devices, an engine) once on the device."""
    path = Path(path)
    if device.url is not None:
        _agent_info(device)
        return client(device).infer(path, inputs)
    if device.backend == "onnxruntime":
        from profiling.onnxruntime_runner import OnnxRuntimeRunner

        with OnnxRuntimeRunner(path, threads=device.resolved_threads()) as runner:
            return runner.infer(inputs)
    from profiling.tensorrt_runner import TensorRTRunner

    if path.suffix == ".onnx":
        raise DeepLSPError(f"{path}: build an engine first (device {device.name!r} runs TensorRT)")
    with TensorRTRunner(path) as runner:
        return runner.infer(inputs)


@dataclass(frozen=True)
class DeviceStatus:
    device: DeviceSpec
    status: str  # "ready", or why it is not
    fingerprint: dict | None


def device_statuses(url: str | None = None) -> list[DeviceStatus]:
    """Every known device and whether it can be measured now. `url` (else
    $DEEPLSP_DEVICE_URL) is an agent: it is shown against the device it serves."""
    import os

    from devices import DEVICES
    from devices.config import (
        ENV_URL,
        check_url,
        load_config,
        missing_requirements,
        on_jetson,
        resolve_device,
    )

    config = load_config()
    url = url or os.environ.get(ENV_URL)
    served = None
    if url:
        url = check_url(url)
        try:
            served = served_device(url)
        except DeepLSPError as exc:
            served, why = None, str(exc)
    out = []
    for spec in DEVICES:
        try:
            if url and (served == spec.name or (served is None and spec.location == "agent")):
                if served is None:
                    raise DeepLSPError(why)
                device = resolve_device(spec.name, url, config={})
            else:
                section = config.get("devices", {}).get(spec.name, {})
                if not section.get("url") and spec.location == "agent" and not on_jetson():
                    out.append(DeviceStatus(spec, "no agent URL (see --device-url)", None))
                    continue
                if not section.get("url") and missing_requirements(spec):
                    needs = ", ".join(missing_requirements(spec))
                    out.append(DeviceStatus(spec, f"needs {needs}", None))
                    continue
                device = resolve_device(spec.name, section.get("url"), config={})
            fp = fingerprint(device)
            out.append(DeviceStatus(device, "ready", fp))
        except DeepLSPError as exc:
            out.append(DeviceStatus(spec, str(exc), None))
    return out
