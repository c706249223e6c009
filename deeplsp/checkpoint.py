"""Checkpoints that know which model they hold.

The file stores the registry name and build arguments next to the
`state_dict`, so `load_checkpoint` rebuilds the model without the caller
repeating them, and refuses a checkpoint for another model. Everything in it
is a plain container or a tensor, so it loads with `weights_only=True`.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from deeplsp import __version__
from deeplsp.atomic import atomic_path
from deeplsp.errors import DeepLSPError, first_line
from deeplsp.models import build_model, input_shape

FORMAT = "deeplsp.checkpoint/1"


@dataclass
class Checkpoint:
    model_name: str
    build: dict  # num_classes, in_channels, input_size
    state_dict: dict
    dataset: str | None = None
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    channels: dict[str, int] | None = None  # per-group channel counts of a pruned model

    def build_model(self) -> nn.Module:
        """The architecture (pruned to `channels` when set) with the saved weights."""
        model = build_model(self.model_name, **self.build)
        if self.channels:
            from deeplsp.structure import prune_groups

            prune_groups(model, (1, *self.input_shape), self.channels)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise DeepLSPError(
                f"checkpoint weights do not fit {self.model_name} {self.build}: {first_line(exc)}"
            ) from exc
        return model

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return input_shape(self.build)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_name: str,
    build: dict,
    dataset: str | None = None,
    metrics: dict | None = None,
    config: dict | None = None,
    channels: dict[str, int] | None = None,
) -> Path:
    payload = {
        "format": FORMAT,
        "deeplsp_version": __version__,
        "model": model_name,
        "build": dict(build),
        "dataset": dataset,
        "metrics": dict(metrics or {}),
        "config": dict(config or {}),
        "channels": dict(channels) if channels else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, expect_model: str | None = None) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise DeepLSPError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError) as exc:
        raise DeepLSPError(
            f"{path} is not a readable checkpoint (corrupt, or holds more than weights): "
            f"{first_line(exc)}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DeepLSPError(
            f"{path} is not a DeepLSP checkpoint (expected format {FORMAT!r}); "
            "create one with `deeplsp train`"
        )
    name = payload["model"]
    if expect_model is not None and name != expect_model:
        raise DeepLSPError(f"{path} holds a {name} checkpoint, not {expect_model}")
    return Checkpoint(
        model_name=name,
        build=dict(payload["build"]),
        state_dict=payload["state_dict"],
        dataset=payload.get("dataset"),
        metrics=dict(payload.get("metrics") or {}),
        config=dict(payload.get("config") or {}),
        channels=payload.get("channels"),
    )
