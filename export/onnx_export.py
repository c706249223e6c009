"""Export a PyTorch model to one self-contained, verified ONNX file.

The file at the destination path is only ever a complete model that passed the ONNX checker
and (unless disabled) matched the PyTorch model numerically: it is written to a temporary file
next to the destination and moved into place with ``os.replace``.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deeplsp.atomic import atomic_path
from deeplsp.errors import DeepLSPError, first_line
from deeplsp.modes import check_shape, eval_mode

if TYPE_CHECKING:
    import onnx

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class ExportResult:
    """What was written, so reports can say how the ONNX file was produced and checked."""

    path: Path
    input_shape: tuple[int, ...]
    opset: int
    exporter: str  # "dynamo" or "legacy"
    simplified: bool
    size_bytes: int
    max_abs_diff: float | None  # None when verification was skipped
    atol: float
    checks: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for run records."""
        return {
            "path": str(self.path),
            "input_shape": list(self.input_shape),
            "opset": self.opset,
            "exporter": self.exporter,
            "simplified": self.simplified,
            "size_bytes": self.size_bytes,
            "max_abs_diff": self.max_abs_diff,
            "atol": self.atol,
            "checks": self.checks,
        }


def _on_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself if it already lives on the CPU, else a CPU copy (the caller's stays put)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return model
    return copy.deepcopy(model).to("cpu")


def _export_dynamo(model: torch.nn.Module, x: torch.Tensor, opset: int) -> onnx.ModelProto:
    program = torch.onnx.export(
        model,
        (x,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        verbose=False,
    )
    # The in-memory proto holds the weights; saving it ourselves avoids the exporter's
    # external-data sidecar file.
    proto = program.model_proto
    got = _opset_of(proto)
    if got != opset:  # dynamo quietly keeps its own opset when it cannot convert down
        raise DeepLSPError(f"produced opset {got} instead of {opset}")
    return proto


def _export_legacy(model: torch.nn.Module, x: torch.Tensor, opset: int) -> onnx.ModelProto:
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer warnings
        torch.onnx.export(
            model,
            (x,),
            buf,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def _checked(proto: onnx.ModelProto, what: str) -> onnx.ModelProto:
    import onnx

    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise DeepLSPError(f"{what} is not a valid ONNX model: {first_line(exc)}") from exc
    return proto


def _export_proto(
    model: torch.nn.Module, input_shape: tuple[int, ...], opset: int
) -> tuple[onnx.ModelProto, str]:
    """Dynamo first; the legacy TorchScript exporter only for models dynamo cannot handle."""
    x = torch.zeros(input_shape)
    reasons = []
    for name, export in (("dynamo", _export_dynamo), ("legacy", _export_legacy)):
        try:
            proto = export(model, x, opset)
            return _checked(proto, f"the {name} exporter's output"), name
        except Exception as exc:  # exporters raise anything from tracing errors to asserts
            reasons.append(f"{name}: {first_line(exc)}")
    raise DeepLSPError(f"ONNX export failed ({'; '.join(reasons)})")


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    try:
        slimmed = onnxslim.slim(proto)
    except Exception as exc:
        raise DeepLSPError(f"onnxslim failed to simplify the model: {first_line(exc)}") from exc
    if slimmed is None:
        raise DeepLSPError("onnxslim failed to simplify the model")
    return _checked(slimmed, "the simplified model")


def _opset_of(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise DeepLSPError("the exported model declares no default ONNX opset")


def _serialize(proto: onnx.ModelProto) -> bytes:
    import onnx

    external = [
        t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise DeepLSPError(f"the exported model refers to external weight data ({external[0]})")
    try:
        return proto.SerializeToString()
    except ValueError as exc:  # protobuf refuses messages over 2 GB
        raise DeepLSPError(f"cannot serialize the ONNX model: {first_line(exc)}") from exc


def export_onnx(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    path: str | Path,
    *,
    opset: int = 18,
    simplify: bool = False,
    verify: bool = True,
    atol: float = 1e-3,
    checks: int = 3,
    seed: int = 0,
) -> ExportResult:
    """Export with a fixed input shape so edge runtimes can plan memory and pick kernels ahead.

    The graph input is named "input" and the first output "logits". The dynamo exporter is
    tried first; the legacy TorchScript one only when dynamo fails or cannot honour `opset`
    (it emits opset 18 or later). The caller's model keeps its device and train/eval flags.
    Nothing is left at `path` unless every step succeeded.
    """
    shape = check_shape(input_shape)
    path = Path(path)
    if path.is_dir():
        raise DeepLSPError(f"cannot write the ONNX model to {path}: it is a directory")
    if verify and checks < 1:
        raise DeepLSPError(f"checks must be >= 1 (got {checks})")
    if atol < 0:
        raise DeepLSPError(f"atol must be >= 0 (got {atol})")

    cpu_model = _on_cpu(model)
    with eval_mode(cpu_model):
        proto, exporter = _export_proto(cpu_model, shape, opset)
        if simplify:
            proto = _simplify(proto)
        data = _serialize(proto)
        diff = None
        try:
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
                if verify:
                    diff = verify_onnx(cpu_model, tmp, shape, atol=atol, checks=checks, seed=seed)
        except OSError as exc:
            raise DeepLSPError(f"cannot write the ONNX model to {path}: {exc}") from exc

    return ExportResult(
        path=path,
        input_shape=shape,
        opset=_opset_of(proto),
        exporter=exporter,
        simplified=simplify,
        size_bytes=len(data),
        max_abs_diff=diff,
        atol=float(atol),
        checks=checks if verify else 0,
    )


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat_outputs(o)]
    raise DeepLSPError(f"cannot compare model outputs of type {type(out).__name__}")


def _abs_diff(a: Any, b: Any) -> float:
    """Max |a - b|; equal values (inf == inf, nan vs nan) count 0, a one-sided nan counts inf."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise DeepLSPError(f"ONNX output shape {b.shape} differs from the PyTorch shape {a.shape}")
    if a.size == 0:
        return 0.0
    with np.errstate(invalid="ignore"):
        d = np.abs(a - b)
    d[(a == b) | (np.isnan(a) & np.isnan(b))] = 0.0
    d[np.isnan(d)] = np.inf
    return float(d.max())


def verify_onnx(
    model: torch.nn.Module,
    onnx_path_or_bytes: str | Path | bytes,
    input_shape: tuple[int, ...],
    *,
    atol: float = 1e-3,
    checks: int = 3,
    seed: int = 0,
) -> float:
    """Catch silent exporter mistakes before a wrong model is benchmarked or deployed.

    Compares the model (eval, no grad, CPU) with ONNX Runtime on `checks` seeded N(0,1) inputs
    and returns the max abs difference; raises DeepLSPError when it exceeds `atol`.
    """
    import onnxruntime as ort

    shape = check_shape(input_shape)
    if checks < 1:
        raise DeepLSPError(f"checks must be >= 1 (got {checks})")
    src = onnx_path_or_bytes
    if isinstance(src, Path):
        src = str(src)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise DeepLSPError(f"ONNX Runtime cannot load the model: {first_line(exc)}") from exc
    input_name = session.get_inputs()[0].name

    cpu_model = _on_cpu(model)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    with eval_mode(cpu_model), torch.no_grad():
        for _ in range(checks):
            x = torch.randn(shape, generator=gen)
            expected = _flat_outputs(cpu_model(x))
            try:
                got = session.run(None, {input_name: x.numpy()})
            except Exception as exc:
                raise DeepLSPError(
                    f"ONNX Runtime failed to run the model: {first_line(exc)}"
                ) from exc
            if len(got) != len(expected):
                raise DeepLSPError(
                    f"ONNX model has {len(got)} outputs, the PyTorch model {len(expected)}"
                )
            for e, g in zip(expected, got, strict=True):
                worst = max(worst, _abs_diff(e.detach().float().numpy(), g))
    if worst > atol:
        raise DeepLSPError(
            f"ONNX output differs from the PyTorch model: max abs diff {worst:.3g} > atol {atol:g}"
        )
    return worst


def load_onnx_checked(path: str | Path) -> onnx.ModelProto:
    """Load a model file, turning any reason it is unusable into a one-line user error."""
    import onnx

    path = Path(path)
    try:
        if not path.is_file():
            raise FileNotFoundError("no such file" if not path.exists() else "not a regular file")
        onnx.checker.check_model(str(path))  # path form: also works for external data
        return onnx.load(str(path))
    except Exception as exc:
        raise DeepLSPError(f"{path} is not a valid ONNX model: {first_line(exc)}") from exc
