"""The one pruner interface: DeepLSP and the ten baselines each implement `Method`.

A method receives a `PruneJob` (the trained dense model, real data, the device,
the training budget every method gets) and returns an `Outcome`: the pruned
torch model and the target it aimed at. Everything after that (evaluation,
ONNX export verified against PyTorch, latency on the device, sparsity, sizes,
the report) is shared in `deeplsp.compare`, so every method is measured the
same way.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from deeplsp.errors import DeepLSPError
from deeplsp.registry import Registry
from deeplsp.training import TrainConfig
from devices import DeviceSpec

Batches = list[tuple[torch.Tensor, torch.Tensor]]
TARGET_METRICS = ("sparsity", "channel_reduction", "latency_ms")


@dataclass
class PruneJob:
    """What every method gets. `dense` is shared: copy it (`copy_dense`) before changing it."""

    model_name: str
    dataset: str
    build: dict  # the model's build arguments (num_classes, in_channels, input_size)
    dense: nn.Module
    shape: tuple[int, ...]  # the device's input shape, batch included
    train_loader: DataLoader
    calib: Batches  # a few real training batches: saliency, sensitivity, Hessian-free scores
    val: Batches  # held-out batches for methods that score candidates on validation data
    train_cfg: TrainConfig  # its `epochs` is the training budget every method gets
    device: DeviceSpec
    seed: int = 0
    quick: bool = False
    data_dir: str | None = None
    dense_checkpoint: Path | None = None
    train_subset: int | None = None  # the subsets the job's data came from (for DeepLSP,
    test_subset: int | None = None  # which loads its own data by dataset name)
    work_dir: Path | None = None  # scratch space of this (model, dataset, method) cell
    log: Callable[[str], None] = print

    def copy_dense(self) -> nn.Module:
        return copy.deepcopy(self.dense).train()

    def fresh_model(self) -> nn.Module:
        """The same architecture, re-initialised (for methods that prune at initialisation)."""
        from deeplsp.models import build_model

        torch.manual_seed(self.seed)
        return build_model(self.model_name, **self.build)


@dataclass
class Outcome:
    """A method's result. `target` names what it aimed at: `sparsity` (fraction of conv and
    linear weights that are zero), `channel_reduction` (fraction of prunable channels
    removed) or `latency_ms` (measured median on the device), and whether the method
    reaches it exactly by construction."""

    model: nn.Module
    structured: bool  # channels physically removed
    target_metric: str
    target: float
    exact: bool = True
    channels: dict[str, int] | None = None  # kept channels per group: rebuilds the checkpoint
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target_metric not in TARGET_METRICS:
            raise DeepLSPError(
                f"target metric must be one of {', '.join(TARGET_METRICS)} "
                f"(got {self.target_metric!r})"
            )


class Method(ABC):
    """A pruning method. Subclasses set the class attributes and implement `run`."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line, with the paper
    kind: ClassVar[str]  # "structured", "unstructured" or "hybrid"
    Config: ClassVar[type]  # a dataclass; its defaults are the seed's settings

    @abstractmethod
    def run(self, job: PruneJob, cfg: Any) -> Outcome: ...

    def config(self, overrides: Sequence[str] = ()) -> Any:
        """The default config with `key=value` overrides (the CLI's `--set`), type-checked."""
        return parse_overrides(self.Config, overrides)


METHODS: Registry[Method] = Registry("pruner")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: one instance of each method in METHODS."""
    METHODS.register(cls())
    return cls


def _convert(text: str, kind: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if origin is not None and type(None) in typing.get_args(kind):
        if text.lower() == "none":
            return None
        if len(args) == 1:
            return _convert(text, args[0], key)
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise DeepLSPError(f"--set {key}: expected true or false (got {text!r})")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise DeepLSPError(f"--set {key}: expected {kind.__name__} (got {text!r})") from None
    if origin is typing.Literal:
        allowed = typing.get_args(kind)
        if text not in allowed:
            raise DeepLSPError(f"--set {key}: choose from {', '.join(allowed)} (got {text!r})")
        return text
    if kind is str:
        return text
    raise DeepLSPError(f"--set {key}: cannot set a setting of type {kind}")


def parse_overrides(config_cls: type, overrides: Sequence[str]) -> Any:
    """`config_cls()` with each `key=value` applied; unknown keys and bad values are errors."""
    hints = typing.get_type_hints(config_cls)
    names = [f.name for f in dataclasses.fields(config_cls)]
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise DeepLSPError(f"--set expects key=value (got {item!r})")
        if key not in names:
            raise DeepLSPError(
                f"--set {key}: unknown setting of {config_cls.__qualname__}; "
                f"known: {', '.join(names)}"
            )
        values[key] = _convert(text.strip(), hints[key], key)
    return config_cls(**values)


def config_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
