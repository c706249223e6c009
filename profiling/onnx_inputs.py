"""The inputs an ONNX file takes, read without its weights and without torch (the
agent and the ONNX Runtime child processes never import torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deeplsp.errors import DeepLSPError, first_line


def onnx_input_specs(path: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Input name -> (fixed shape, dtype) of an ONNX file, read without its weights."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf raises assorted types on corrupt files
        raise DeepLSPError(f"cannot read ONNX file {path}: {first_line(exc)}") from exc
    weights = {init.name for init in graph.initializer}
    specs = {}
    for inp in graph.input:
        if inp.name in weights:
            continue
        tensor = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if any(d is None or d < 1 for d in dims):
            raise DeepLSPError(
                f"input {inp.name!r} of {path} has a dynamic shape; export with a fixed shape"
            )
        specs[inp.name] = (tuple(dims), onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    return specs
