"""MAC and parameter counting: conv/linear MACs, identical on a model and its ONNX export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from deeplsp.errors import DeepLSPError
from export import export_onnx
from profiling.counting import ModelCost, count_onnx, count_torch, layer_weights
from tests.tiny_models import TinyCNN


def resnet18_cifar() -> nn.Module:
    m = torchvision.models.resnet18(num_classes=10)
    m.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


def trained_like(model: nn.Module) -> nn.Module:
    """Random biases and BN statistics, as after training: the exporter drops all-zero biases."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.data = torch.randn(m.bias.shape, generator=g)
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.randn(c, generator=g)
            m.running_mean = torch.randn(c, generator=g)
            m.running_var = torch.rand(c, generator=g) + 0.5
    return model.eval()


def folded_bn_channels(model: nn.Module) -> int:
    """Folding a BN into its bias-free conv removes 2C values and adds a C-value bias."""
    return sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# -- count_torch -------------------------------------------------------------------------


def test_count_torch_tiny_cnn_by_hand() -> None:
    cost = count_torch(TinyCNN(), (1, 3, 8, 8))
    conv = 3 * 9 * 8 * 8 * 8  # C_in * k * C_out * H * W
    dw = 9 * 8 * 4 * 4  # depthwise: one 3x3 filter per channel, stride 2
    fc = 8 * 5
    assert cost.macs == conv + dw + fc
    assert cost.params == sum(p.numel() for p in TinyCNN().parameters())


def test_count_torch_is_per_sample() -> None:
    assert count_torch(TinyCNN(), (1, 3, 8, 8)) == count_torch(TinyCNN(), (4, 3, 8, 8))


def test_count_torch_conv_transpose_by_hand() -> None:
    up = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
    # every input element is multiplied into (C_out / groups) * k * k outputs
    assert count_torch(up, (1, 6, 5, 5)).macs == 6 * 5 * 5 * 2 * 2 * 2


def test_count_torch_restores_modes_and_leaves_weights() -> None:
    model = TinyCNN().train()
    model.fc.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_torch(model, (2, 3, 8, 8))
    assert model.training and model.bn.training and not model.fc.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats untouched


def test_count_torch_bad_shape_is_user_error() -> None:
    with pytest.raises(DeepLSPError, match="shape"):
        count_torch(TinyCNN(), (1, 5, 8, 8))


def test_model_cost_to_dict_is_json() -> None:
    assert json.loads(json.dumps(ModelCost(3, 4).to_dict())) == {"macs": 3, "params": 4}


# -- count_onnx on a hand-built graph: each node kind against its torch twin ---------------


class Twin(nn.Module):
    """The torch model that `handmade_graph` spells out node by node."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.relu6 = nn.ReLU6()
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
        self.hs = nn.Hardsigmoid()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)
        self.proj = nn.Linear(5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu6(self.relu(self.bn(self.conv(x)))))
        x = self.gap(self.hs(self.up(x)))
        return self.proj(self.fc(torch.flatten(x, 1)))


def handmade_graph(batch: int | str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [
        init("conv.w", 6, 3, 3, 3),
        init("conv.b", 6),
        init("bn.scale", 6),
        init("bn.bias", 6),
        init("bn.mean", 6),
        init("bn.var", 6),
        numpy_helper.from_array(np.array(0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6, np.float32), "six"),
        init("up.w", 6, 2, 2, 2),  # (C_in, C_out / groups, k, k)
        init("up.b", 4),
        numpy_helper.from_array(np.array([batch if isinstance(batch, int) else -1, 4]), "flat"),
        init("fc.w", 5, 4),
        init("fc.b", 5),
        init("proj.w", 5, 3),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b"]
        ),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("Clip", ["r", "zero", "six"], ["r6"]),
        helper.make_node("MaxPool", ["r6"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ConvTranspose", ["p", "up.w", "up.b"], ["u"], strides=[2, 2], group=2),
        helper.make_node("HardSigmoid", ["u"], ["h"]),
        helper.make_node("ReduceMean", ["h"], ["g"], axes=[2, 3], keepdims=1),
        helper.make_node("Reshape", ["g", "flat"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["l"], transB=1),
        helper.make_node("MatMul", ["l", "proj.w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "twin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])],
        inits,
    )
    # ReduceMean takes `axes` as an attribute up to opset 17
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("batch", [1, 2])
def test_count_onnx_rules_match_torch_exactly(batch: int) -> None:
    model = handmade_graph(batch)
    onnx.checker.check_model(model, full_check=True)
    assert count_onnx(model) == count_torch(Twin(), (batch, 3, 8, 8))


def test_count_onnx_params_skip_bn_statistics_and_scalars() -> None:
    # float initializers hold 24 more values than the twin's parameters: BN mean/var, Clip bounds
    cost = count_onnx(handmade_graph(1))
    assert cost.params == sum(p.numel() for p in Twin().parameters())


def test_count_onnx_dynamic_batch_is_user_error() -> None:
    with pytest.raises(DeepLSPError, match="dynamic"):
        count_onnx(handmade_graph("N"))


@pytest.mark.parametrize("content", [None, b"", b"\x08garbage\xff\xfe not protobuf"])
def test_count_onnx_bad_file_is_user_error(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DeepLSPError, match="is not a valid ONNX model") as err:
        count_onnx(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# -- count_onnx on real exports ---------------------------------------------------------------

MODELS = {
    "tiny_cnn": (TinyCNN, (1, 3, 8, 8)),
    "tiny_cnn_batch2": (TinyCNN, (2, 3, 8, 8)),
    "resnet18_cifar": (resnet18_cifar, (1, 3, 32, 32)),
    "mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
        (1, 3, 32, 32),
    ),
}


@pytest.mark.parametrize("name", MODELS)
def test_count_onnx_of_export_matches_torch(tmp_path: Path, name: str) -> None:
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = trained_like(make())
    torch_cost = count_torch(model, shape)
    assert torch_cost.params == sum(p.numel() for p in model.parameters())

    result = export_onnx(model, shape, tmp_path / "m.onnx", verify=False)
    proto = onnx.load(str(result.path))
    # the documented parameter difference applies because every BN was folded into a conv
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert count_onnx(result.path) == ModelCost(
        macs=torch_cost.macs, params=torch_cost.params - folded_bn_channels(model)
    )
    assert count_onnx(proto) == count_onnx(str(result.path))
    # the layers' weights, as the latency model counts them: BatchNorm folding keeps them
    layers = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    assert layer_weights(result.path) == sum(
        m.weight.numel() for m in model.modules() if isinstance(m, layers)
    )
