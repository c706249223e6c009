"""ONNX Runtime runner: the `cpu` device's latency backend."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from deeplsp.errors import DeepLSPError, first_line
from profiling.runner import Runner

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def profiled_runs(events: list[dict], iters: int) -> list[list[dict]]:
    """The node kernel-time events of each of the last `iters` runs in an ONNX Runtime
    profile (its JSON events)."""
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    if len(runs) < iters:
        raise DeepLSPError(f"the profile holds {len(runs)} runs, fewer than the {iters} timed")
    nodes = [
        e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
    ]
    return [
        [n for n in nodes if run["ts"] <= n["ts"] <= run["ts"] + run["dur"]]
        for run in runs[-iters:]
    ]


def kernel_samples(events: list[dict], iters: int, skip_ops: Iterable[str]) -> list[float]:
    """Per run, in ms, the summed kernel times of the nodes whose op is not in `skip_ops`,
    for the last `iters` runs in an ONNX Runtime profile."""
    skip = set(skip_ops)
    return [
        sum(n["dur"] for n in run if n.get("args", {}).get("op_name") not in skip) / 1e3
        for run in profiled_runs(events, iters)
    ]


class OnnxRuntimeRunner(Runner):
    """With `kernels_except` (op types), a run's time is the summed kernel time of its
    other nodes by ONNX Runtime's profiler, instead of the wall time of the call: how the
    latency table times one layer without the layout conversions and the call that only
    a layer run alone pays (see profiling.latency_table.layer_onnx)."""

    name = "onnxruntime"

    def __init__(
        self,
        model: str | Path | bytes,
        threads: int = 1,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        kernels_except: Iterable[str] | None = None,
    ) -> None:
        super().__init__()
        if threads < 1:
            raise DeepLSPError(f"threads must be >= 1 (got {threads})")
        self.model = model
        self.threads = threads
        self.providers = providers
        self.kernels_except = None if kernels_except is None else tuple(kernels_except)
        self.session = None
        self._profile_dir: tempfile.TemporaryDirectory | None = None

    def _activate_impl(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if self.kernels_except is not None:
            if self._profile_dir is None:
                self._profile_dir = tempfile.TemporaryDirectory(prefix="deeplsp-profile-")
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(self._profile_dir.name) / "run")
        src = self.model if isinstance(self.model, bytes) else str(self.model)
        try:
            self.session = ort.InferenceSession(src, opts, providers=list(self.providers))
        except Exception as exc:  # ORT raises several unrelated types for bad files
            what = "ONNX bytes" if isinstance(self.model, bytes) else str(self.model)
            raise DeepLSPError(f"ONNX Runtime cannot load {what}: {first_line(exc)}") from exc

    def _deactivate_impl(self) -> None:
        if self.session is not None and self.kernels_except is not None:
            Path(self.session.end_profiling()).unlink(missing_ok=True)
        self.session = None
        if self._profile_dir is not None:
            self._profile_dir.cleanup()
            self._profile_dir = None

    def _timed_runs_impl(
        self, feed: dict[str, np.ndarray], iters: int
    ) -> tuple[list[float], list[float] | None]:
        if self.kernels_except is None:
            return super()._timed_runs_impl(feed, iters)
        for _ in range(iters):
            self._infer_impl(feed)
        profile = Path(self.session.end_profiling())
        try:
            events = json.loads(profile.read_text())
        finally:
            profile.unlink(missing_ok=True)
        self._activate_impl()  # profiling has ended for this session; the next window needs one
        return kernel_samples(events, iters, self.kernels_except), None

    def _input_specs_impl(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        specs = {}
        for inp in self.session.get_inputs():
            if any(not isinstance(d, int) for d in inp.shape):
                raise DeepLSPError(
                    f"input {inp.name!r} has a dynamic shape {inp.shape}; export with a fixed shape"
                )
            specs[inp.name] = (tuple(inp.shape), _ORT_TYPES.get(inp.type, np.float32))
        return specs

    def _infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feed), strict=True))

    def settings(self) -> dict:
        import onnxruntime as ort

        return {
            "runtime": "onnxruntime",
            "version": ort.__version__,
            "providers": list(self.providers),
            "intra_op_threads": self.threads,
            "inter_op_threads": 1,
            "graph_optimization": "ORT_ENABLE_ALL",
            **(
                {"timed": f"kernel time, without {', '.join(self.kernels_except)}"}
                if self.kernels_except is not None
                else {}
            ),
        }
