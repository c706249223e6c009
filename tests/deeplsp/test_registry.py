from dataclasses import dataclass

import pytest

from deeplsp.errors import DeepLSPError, UnknownNameError
from deeplsp.registry import Registry


@dataclass(frozen=True)
class Thing:
    name: str
    description: str
    size: int = 0


def test_get_list_and_unknown_name_lists_valid_ones():
    reg: Registry[Thing] = Registry("thing")
    reg.register(Thing("a", "first", 1))
    reg.register(Thing("b", "second", 2))
    assert reg.get("b").size == 2
    assert reg.names() == ["a", "b"]
    assert [t.name for t in reg.list(lambda t: t.size > 1)] == ["b"]
    assert "a" in reg and "z" not in reg and len(reg) == 2
    with pytest.raises(UnknownNameError) as info:
        reg.get("z")
    assert str(info.value) == "unknown thing 'z'; choose from: a, b"


def test_duplicate_registration_is_refused():
    reg: Registry[Thing] = Registry("thing")
    reg.register(Thing("a", "first"))
    with pytest.raises(DeepLSPError, match="already registered"):
        reg.register(Thing("a", "again"))


def test_project_registries_hold_the_documented_names():
    from deeplsp.datasets import DATASETS
    from deeplsp.models import MODELS
    from devices import DEVICES

    assert MODELS.names() == ["resnet18", "resnet50", "vgg16", "mobilenet_v3_large"]
    assert set(DATASETS.names()) == {"cifar10", "cifar100", "fashionmnist", "imagenet"}
    assert "cpu" in DEVICES
