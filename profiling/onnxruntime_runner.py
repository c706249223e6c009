"""ONNX Runtime runner: the `cpu` device's latency backend."""

from __future__ import annotations

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


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(
        self,
        model: str | Path | bytes,
        threads: int = 1,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
    ) -> None:
        super().__init__()
        if threads < 1:
            raise DeepLSPError(f"threads must be >= 1 (got {threads})")
        self.model = model
        self.threads = threads
        self.providers = providers
        self.session = None

    def _activate_impl(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        src = self.model if isinstance(self.model, bytes) else str(self.model)
        try:
            self.session = ort.InferenceSession(src, opts, providers=list(self.providers))
        except Exception as exc:  # ORT raises several unrelated types for bad files
            what = "ONNX bytes" if isinstance(self.model, bytes) else str(self.model)
            raise DeepLSPError(f"ONNX Runtime cannot load {what}: {first_line(exc)}") from exc

    def _deactivate_impl(self) -> None:
        self.session = None

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
        }
