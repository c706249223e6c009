"""MACs and parameter counts for PyTorch models and their ONNX exports.

Convention: MACs are the multiply-accumulates of convolutions and fully connected
layers, per sample, as the pruning literature reports them (Li et al. 2017; the
0.56 GMACs of a CIFAR ResNet-18). Bias adds, normalisation, activations and
pooling are not counted: they are a rounding error next to the convolutions,
and leaving them out makes the count identical on both sides of an export,
where BatchNorm is folded into the convolution before it.

* Conv: prod(output shape per sample) * (C_in / groups) * prod(kernel).
* ConvTranspose: prod(input shape per sample) * (C_out / groups) * prod(kernel).
* Linear / Gemm / MatMul: prod(output shape per sample) * in_features.

`params` is `sum(p.numel())` for a PyTorch model (buffers excluded). For an
ONNX graph it is the number of stored floating-point weights (BatchNorm running
statistics and 0-d constants excluded); after BatchNorm folding it is lower
than the PyTorch count by one value per folded channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deeplsp.errors import DeepLSPError, first_line
from deeplsp.modes import check_shape, eval_mode

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class ModelCost:
    """Per-sample conv/linear MACs and parameter count (see the module doc)."""

    macs: int
    params: int

    def to_dict(self) -> dict[str, int]:
        """JSON-able form for run records."""
        return {"macs": self.macs, "params": self.params}


def count_torch(model: torch.nn.Module, input_shape: tuple[int, ...]) -> ModelCost:
    """Conv/linear MACs per sample of one forward pass, and the parameter count."""
    shape = check_shape(input_shape)
    params = list(model.parameters())
    ref = params[0] if params else next(model.buffers(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            per = module.out_channels // module.groups * math.prod(module.kernel_size)
            total += inputs[0].numel() * per
        elif isinstance(module, nn.modules.conv._ConvNd):
            per = module.in_channels // module.groups * math.prod(module.kernel_size)
            total += output.numel() * per
        else:  # Linear
            total += output.numel() * module.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)
    ]
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(shape, device=device, dtype=dtype))
    except Exception as exc:  # a forward that rejects the shape, typically
        raise DeepLSPError(
            f"cannot run the model on an input of shape {shape}: {first_line(exc)}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
    return ModelCost(macs=total // shape[0], params=sum(p.numel() for p in params))


_FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _load(model: str | Path | onnx.ModelProto, shapes: bool = True) -> onnx.ModelProto:
    """The graph, checked, its local functions inlined and (`shapes`) its shapes inferred:
    two thirds of the time for a ResNet-18, which counting weights does not need."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        what, src = "the model", model
    else:
        path = Path(model)
        what, src = str(path), str(path)
    try:
        if not isinstance(src, onnx.ModelProto) and not Path(src).is_file():
            raise FileNotFoundError("no such file")
        onnx.checker.check_model(src)
        if not isinstance(src, onnx.ModelProto):
            src = onnx.load(src, load_external_data=False)  # shapes need no weight data
        proto = src
        if proto.functions:
            proto = onnx.inliner.inline_local_functions(proto)
        return onnx.shape_inference.infer_shapes(proto) if shapes else proto
    except Exception as exc:
        raise DeepLSPError(f"{what} is not a valid ONNX model: {first_line(exc)}") from exc


def _static_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...] | None]:
    """Tensor name -> shape, or None where a dimension is unknown or symbolic."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            shapes.setdefault(vi.name, None)
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        shapes[vi.name] = None if None in dims else tuple(dims)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _node_macs(node: onnx.NodeProto, shape: Any) -> int:
    """Conv/linear MACs of one node (module doc); `shape(name)` is the static shape."""
    op = node.op_type
    if op == "Conv":
        y, w = shape(node.output[0]), shape(node.input[1])  # w: (C_out, C_in/groups, *k)
        return math.prod(y) * math.prod(w[1:])
    if op == "ConvTranspose":
        x, w = shape(node.input[0]), shape(node.input[1])  # w: (C_in, C_out/groups, *k)
        return math.prod(x) * math.prod(w[1:])
    if op == "Gemm":
        a, y = shape(node.input[0]), shape(node.output[0])
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        return math.prod(y) * (a[0] if trans_a else a[1])
    if op == "MatMul":
        return math.prod(shape(node.output[0])) * shape(node.input[0])[-1]
    return 0


def count_onnx(model: str | Path | onnx.ModelProto) -> ModelCost:
    """Cost of an ONNX graph; its MACs equal count_torch's for the model it was exported from."""
    proto = _load(model)
    graph = proto.graph
    shapes = _static_shapes(graph)
    init_names = {i.name for i in graph.initializer}

    def shape_for(node: onnx.NodeProto) -> Any:
        def shape(name: str) -> tuple[int, ...]:
            s = shapes.get(name)
            if s is None:
                raise DeepLSPError(
                    f"cannot count MACs of {node.op_type} node {node.name!r}: the shape of "
                    f"{name!r} is unknown or dynamic (export with a fixed input shape)"
                )
            return s

        return shape

    total = sum(_node_macs(node, shape_for(node)) for node in graph.node)

    data_inputs = [i for i in graph.input if i.name not in init_names]
    batch = 1
    if data_inputs:
        first = shapes.get(data_inputs[0].name)
        if first:
            batch = first[0]
    running_stats = {
        name for n in graph.node if n.op_type == "BatchNormalization" for name in n.input[3:5]
    }
    params = sum(
        math.prod(i.dims)
        for i in graph.initializer
        if i.data_type in _FLOAT_TYPES and len(i.dims) > 0 and i.name not in running_stats
    )
    return ModelCost(macs=total // batch, params=int(params))


_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def layer_weights(model: str | Path | onnx.ModelProto) -> int:
    """Weight elements of an ONNX graph's convolutions and fully connected layers (their
    second input, where it is stored): what the network reads from memory once per
    inference, counted as `LayerSig.weights` counts a layer, so a file can be placed
    against the device's cache knee (`profiling.weight_spill`) without its model."""
    proto = _load(model, shapes=False)  # once per paired timing (`Timing.time`)
    init = {i.name: math.prod(i.dims) for i in proto.graph.initializer}
    return sum(
        init.get(node.input[1], 0)
        for node in proto.graph.node
        if node.op_type in _WEIGHTED_OPS and len(node.input) > 1
    )
