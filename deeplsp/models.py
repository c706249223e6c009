"""Model registry: torchvision architectures built for a dataset's shape.

Small inputs (CIFAR, Fashion-MNIST padded to 32 px) use the adaptation the
pruning literature uses, so that 32 px images are not reduced to 1x1 before
the classifier:

- ResNet-18/50: 3x3 stride-1 stem convolution, no stem max-pool (He et al.
  2016, section 4.2; torch-pruning and GReg's CIFAR ResNets); 32 -> 4 px.
- VGG-16: the batch-normalised VGG-16 used by Li et al. 2017 and Network
  Slimming on CIFAR: torchvision's `vgg16_bn` features, a global average pool
  and a 512-512-classes head (the 4096-wide head is for 7x7 ImageNet maps).
- MobileNetV3-Large: stride 1 in the stem and in the first stride-2 block, so
  the network downsamples 8x like the CIFAR ResNets; 32 -> 4 px. At every size its
  BatchNorm momentum is torch's 0.1, not torchvision's 0.01 (see the builder).

At ImageNet size (>= 64 px) the torchvision architectures are used unchanged,
with the first convolution rebuilt when the input is not RGB.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision import models as tvm

from deeplsp.errors import DeepLSPError
from deeplsp.registry import Registry

SMALL_INPUT_MAX = 64  # below this side length, use the CIFAR adaptation


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    build: Callable[[int, int, int], nn.Module]  # (num_classes, in_channels, input_size)
    weights: str  # torchvision weights enum member for --pretrained


MODELS: Registry[ModelEntry] = Registry("model")


def _first_conv(conv: nn.Conv2d, in_channels: int, kernel: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=kernel,
        stride=stride,
        padding=kernel // 2,
        bias=conv.bias is not None,
    )


def _resnet(factory: Callable[..., tvm.ResNet]) -> Callable[[int, int, int], nn.Module]:
    def build(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
        model = factory(num_classes=num_classes)
        if input_size < SMALL_INPUT_MAX:
            model.conv1 = _first_conv(model.conv1, in_channels, kernel=3, stride=1)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = _first_conv(model.conv1, in_channels, kernel=7, stride=2)
        return model

    return build


def _vgg16(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    if input_size < SMALL_INPUT_MAX:
        model = tvm.vgg16_bn(num_classes=num_classes)
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes)
        )
    else:
        model = tvm.vgg16(num_classes=num_classes)
    if in_channels != 3:
        model.features[0] = _first_conv(model.features[0], in_channels, kernel=3, stride=1)
    return model


def _mobilenet_v3_large(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    model = tvm.mobilenet_v3_large(num_classes=num_classes)
    stem = model.features[0][0]
    if input_size < SMALL_INPUT_MAX:
        model.features[0][0] = _first_conv(stem, in_channels, kernel=3, stride=1)
        first_down = model.features[2].block[1][0]  # depthwise 3x3, stride 2, 24 channels
        first_down.stride = (1, 1)
    elif in_channels != 3:
        model.features[0][0] = _first_conv(stem, in_channels, kernel=3, stride=2)
    # torchvision's BatchNorm momentum of 0.01 suits long ImageNet runs; after the short
    # budgets of pruning and fine-tuning the running statistics are still near their
    # initial values (measured: 11% top-1 in eval mode, 70% with batch statistics, after
    # 2 epochs on 2,000 Fashion-MNIST images). torch's default 0.1 tracks them.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    return model


MODELS.register(
    ModelEntry("resnet18", "ResNet-18 (He et al. 2016)", _resnet(tvm.resnet18), "IMAGENET1K_V1")
)
MODELS.register(
    ModelEntry("resnet50", "ResNet-50 (He et al. 2016)", _resnet(tvm.resnet50), "IMAGENET1K_V2")
)
MODELS.register(
    ModelEntry(
        "vgg16",
        "VGG-16; batch-normalised with a 512-wide head on small inputs",
        _vgg16,
        "IMAGENET1K_V1",
    )
)
MODELS.register(
    ModelEntry(
        "mobilenet_v3_large",
        "MobileNetV3-Large (Howard et al. 2019), squeeze-excitation and hard-swish",
        _mobilenet_v3_large,
        "IMAGENET1K_V2",
    )
)


def build_model(
    name: str, num_classes: int, in_channels: int = 3, input_size: int = 32
) -> nn.Module:
    """Build a registered architecture with fresh weights for the given data shape."""
    entry = MODELS.get(name)
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if value < 1:
            raise DeepLSPError(f"{label} must be >= 1 (got {value})")
    if input_size < 8:
        raise DeepLSPError(f"input_size must be >= 8 pixels (got {input_size})")
    return entry.build(num_classes, in_channels, input_size)


def _tv_builder_name(name: str, input_size: int) -> str:
    return "vgg16_bn" if name == "vgg16" and input_size < SMALL_INPUT_MAX else name


def load_pretrained(model: nn.Module, name: str, input_size: int) -> list[str]:
    """Copy torchvision's ImageNet weights into every tensor of matching shape.

    Returns the names of the tensors left at their fresh initialisation (the
    adapted stem and the classifier, typically). Fails with a clear error when
    the weights cannot be fetched (no internet).
    """
    entry = MODELS.get(name)
    tv_name = _tv_builder_name(name, input_size)
    weights_enum = tvm.get_model_weights(tv_name)
    weights_name = entry.weights if tv_name == name else "IMAGENET1K_V1"
    weights = weights_enum[weights_name]
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # URLError, HTTPError, hash mismatch, ...
        raise DeepLSPError(
            f"cannot fetch torchvision's {tv_name} {weights_name} weights ({exc}); "
            f"drop --pretrained, or put the file in {torch.hub.get_dir()}/checkpoints"
        ) from exc
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    return sorted(k for k in own if k not in matched)


def input_shape(build: dict) -> tuple[int, int, int]:
    """(channels, height, width) of one sample, from a model's build arguments."""
    return (build["in_channels"], build["input_size"], build["input_size"])
