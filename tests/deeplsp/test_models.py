"""Every registered model builds for each data shape, trains a step, and exports."""

import pytest
import torch

from deeplsp.errors import DeepLSPError, UnknownNameError
from deeplsp.models import MODELS, build_model, input_shape

ALL = MODELS.names()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_small_input_adaptation_keeps_spatial_detail(name, in_channels):
    """CIFAR-style stems: 32 px reach the last stage at 4x4 (VGG: 2x2 before its last pool)."""
    model = build_model(name, num_classes=7, in_channels=in_channels, input_size=32).eval()
    seen = {}
    if name.startswith("resnet"):
        model.layer4.register_forward_hook(lambda m, i, o: seen.update(map=o.shape))
        expect = 4
    elif name == "vgg16":
        model.features[-2].register_forward_hook(lambda m, i, o: seen.update(map=o.shape))
        expect = 2
    else:
        model.features[-1].register_forward_hook(lambda m, i, o: seen.update(map=o.shape))
        expect = 4
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 32, 32))
    assert out.shape == (2, 7)
    assert seen["map"][-1] == expect


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large"])
def test_imagenet_size_uses_torchvision_architecture(name):
    model = build_model(name, num_classes=5, in_channels=1, input_size=224).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 96, 96)).shape == (1, 5)
    first = model.conv1 if name == "resnet18" else model.features[0][0]
    assert first.stride == (2, 2) and first.in_channels == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_trains_one_step_and_exports_matching_onnxruntime(name, tmp_path):
    from export import export_onnx

    torch.manual_seed(0)
    build = {"num_classes": 10, "in_channels": 3, "input_size": 32}
    model = build_model(name, **build)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    result = export_onnx(model, (1, *input_shape(build)), tmp_path / f"{name}.onnx", checks=2)
    assert result.path.is_file()
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-3


def test_bad_build_arguments_are_clear_errors():
    with pytest.raises(UnknownNameError, match="choose from: resnet18, resnet50"):
        build_model("alexnet", 10)
    with pytest.raises(DeepLSPError, match="num_classes"):
        build_model("resnet18", 0)
    with pytest.raises(DeepLSPError, match="input_size"):
        build_model("resnet18", 10, input_size=4)


def test_pretrained_without_internet_says_so(monkeypatch):
    from torchvision.models import get_model_weights

    from deeplsp.models import load_pretrained

    def offline(self, *a, **k):
        raise OSError("network is unreachable")

    weights_cls = type(get_model_weights("resnet18").IMAGENET1K_V1)
    monkeypatch.setattr(weights_cls, "get_state_dict", offline)
    model = build_model("resnet18", 10)
    with pytest.raises(DeepLSPError, match="cannot fetch torchvision's resnet18"):
        load_pretrained(model, "resnet18", 32)


def test_pretrained_copies_matching_tensors_and_reports_the_rest(monkeypatch):
    from torchvision.models import get_model_weights, resnet18

    from deeplsp.models import load_pretrained

    reference = resnet18()
    weights_cls = type(get_model_weights("resnet18").IMAGENET1K_V1)
    monkeypatch.setattr(weights_cls, "get_state_dict", lambda self, **k: reference.state_dict())
    model = build_model("resnet18", 10, in_channels=3, input_size=32)
    fresh = load_pretrained(model, "resnet18", 32)
    assert fresh == ["conv1.weight", "fc.bias", "fc.weight"]
    assert torch.equal(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)


def test_mobilenet_batchnorm_tracks_statistics_within_short_budgets():
    from torch import nn

    from deeplsp.models import build_model

    model = build_model("mobilenet_v3_large", num_classes=10, in_channels=1, input_size=32)
    momenta = {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert momenta == {0.1}
