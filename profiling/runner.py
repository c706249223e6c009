"""The one runner interface every latency backend implements (Polygraphy style).

A runner is activated (session or engine loaded), runs inference, and measures
latency with a monotonic clock. Subclasses override only the `_*_impl` hooks,
so DeepLSP depends on `measure()` alone and the backend can be ONNX Runtime on
a CPU here or TensorRT on a Jetson.
"""

from __future__ import annotations

import statistics
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from deeplsp.errors import DeepLSPError


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one inference in milliseconds, over `n` timed repeats."""

    median: float
    p90: float
    mean: float
    std: float
    min: float
    n: int
    warmup: int
    # Host<->device copies timed apart from compute; None where there are none (CPU).
    copy_median: float | None = None
    settings: dict = field(default_factory=dict)

    @classmethod
    def from_samples(
        cls,
        samples_ms: list[float],
        warmup: int,
        copy_samples_ms: list[float] | None = None,
        settings: dict | None = None,
    ) -> LatencyStats:
        if not samples_ms:
            raise ValueError("no latency samples")
        arr = np.asarray(samples_ms, dtype=np.float64)
        return cls(
            median=float(np.median(arr)),
            p90=float(np.percentile(arr, 90)),
            mean=float(arr.mean()),
            std=float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            min=float(arr.min()),
            n=int(arr.size),
            warmup=warmup,
            copy_median=statistics.median(copy_samples_ms) if copy_samples_ms else None,
            settings=dict(settings or {}),
        )

    def scaled(self, factor: float) -> LatencyStats:
        """The same timings at another speed of the machine (times x `factor`)."""
        return replace(
            self,
            median=self.median * factor,
            p90=self.p90 * factor,
            mean=self.mean * factor,
            std=self.std * factor,
            min=self.min * factor,
        )

    def to_dict(self) -> dict:
        return asdict(self)


class Runner(ABC):
    """Loads an artefact on a device, runs it, and times it."""

    name = "runner"

    def __init__(self) -> None:
        self.is_active = False

    # -- lifecycle -----------------------------------------------------------
    def activate(self) -> None:
        if not self.is_active:
            self._activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # -- inference -----------------------------------------------------------
    def input_specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        self._require_active()
        return self._input_specs_impl()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._require_active()
        return self._infer_impl(feed)

    def random_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {
            name: rng.standard_normal(shape).astype(dtype)
            for name, (shape, dtype) in self.input_specs().items()
        }

    def measure(
        self, inputs: dict[str, np.ndarray] | None = None, warmup: int = 10, iters: int = 50
    ) -> LatencyStats:
        """Median-centred latency of one inference; never uses wall-clock time."""
        if warmup < 0 or iters < 1:
            raise DeepLSPError(f"warmup must be >= 0 and iters >= 1 (got {warmup}, {iters})")
        self._require_active()
        feed = inputs if inputs is not None else self.random_inputs()
        for _ in range(warmup):
            self._infer_impl(feed)
        samples, copies = self._timed_runs_impl(feed, iters)
        return LatencyStats.from_samples(
            samples, warmup, copy_samples_ms=copies, settings=self.settings()
        )

    def settings(self) -> dict:
        """Runtime settings that affect latency (threads, precision), recorded with it."""
        return {}

    # -- hooks for subclasses ------------------------------------------------
    @abstractmethod
    def _activate_impl(self) -> None: ...

    def _deactivate_impl(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        pass

    @abstractmethod
    def _input_specs_impl(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]: ...

    @abstractmethod
    def _infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def _timed_runs_impl(
        self, feed: dict[str, np.ndarray], iters: int
    ) -> tuple[list[float], list[float] | None]:
        """Compute times in ms, and host<->device copy times where copies are timed apart
        (None here). Host-clock timing; GPU runners override this with device events."""
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            self._infer_impl(feed)
            samples.append((time.perf_counter() - t0) * 1e3)
        return samples, None

    def _require_active(self) -> None:
        if not self.is_active:
            raise RuntimeError(f"{self.name} runner is not active; use it as a context manager")
