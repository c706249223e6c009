"""A tiny, learnable pruning job for every method's tests (seconds, no dataset files)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from deeplsp.methods import PruneJob
from deeplsp.models import MODELS, ModelEntry
from deeplsp.training import TrainConfig, train
from devices import get_device
from tests.tiny_models import TinyResNet

SHAPE = (1, 1, 16, 16)


def _data(n: int, seed: int) -> TensorDataset:
    """Class k lights up a distinct 4x4 patch: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = 0.1 * torch.randn(n, 1, 16, 16, generator=g)
    for i, y in enumerate(labels.tolist()):
        r, c = divmod(y, 4)
        images[i, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.0
    return TensorDataset(images, labels)


@pytest.fixture
def tiny_job(monkeypatch, tmp_path) -> PruneJob:
    """A trained TinyResNet (registered as `tinyresnet`) and its data."""
    monkeypatch.setitem(
        MODELS._entries, "tinyresnet", ModelEntry("tinyresnet", "test model", TinyResNet, "none")
    )
    torch.manual_seed(0)
    build = {"num_classes": 10, "in_channels": 1, "input_size": 16}
    dense = TinyResNet(**build)
    loader = DataLoader(_data(128, 0), batch_size=32, shuffle=True)
    cfg = TrainConfig(epochs=2, optimizer="adamw", lr=3e-3, weight_decay=0.0, batch_size=32)
    train(dense, loader, cfg, desc="dense")
    val = list(DataLoader(_data(64, 1), batch_size=32))
    return PruneJob(
        model_name="tinyresnet",
        dataset="synthetic",
        build=build,
        dense=dense.eval(),
        shape=SHAPE,
        train_loader=loader,
        calib=list(DataLoader(_data(64, 2), batch_size=32)),
        val=val,
        train_cfg=TrainConfig(epochs=1, optimizer="adamw", lr=1e-3, weight_decay=0.0),
        device=get_device("cpu"),
        work_dir=tmp_path / "work",
        log=lambda msg: None,
    )
