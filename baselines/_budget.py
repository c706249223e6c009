"""Splitting one training budget into phases at step granularity, all inside `train()`.

Training-time baselines (GrowingRegularization, ADMMPruner) spend part of the
budget in a penalised phase and the rest fine-tuning. With budgets of one epoch
or less, whole epochs are too coarse a unit, so phases are counted in optimizer
steps: a phase of `n` steps runs `train()` over the first `n` batches of the
training loader, cycled (and re-shuffled) as needed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from deeplsp.errors import DeepLSPError
from deeplsp.methods import PruneJob
from deeplsp.training import TrainHooks, train


class StepLoader:
    """The first `steps` batches of `loader`, cycled: a phase of any length in steps."""

    def __init__(self, loader: DataLoader, steps: int) -> None:
        if len(loader) == 0:
            raise DeepLSPError("the training loader is empty")
        self.loader = loader
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        done = 0
        while done < self.steps:
            for batch in self.loader:
                yield batch
                done += 1
                if done == self.steps:
                    return


def total_steps(job: PruneJob) -> int:
    """The whole budget in optimizer steps: what every method may spend."""
    return job.train_cfg.epochs * len(job.train_loader)


def split_steps(total: int, fraction: float) -> tuple[int, int]:
    """(first, rest) with first ~ fraction * total, at least one step when there is one."""
    if total <= 0:
        return 0, 0
    first = min(total, max(1, round(fraction * total)))
    return first, total - first


def train_steps(
    model: nn.Module, job: PruneJob, steps: int, hooks: TrainHooks | None, desc: str
) -> dict:
    """Train for exactly `steps` optimizer steps with the job's settings (one cosine cycle)."""
    if steps <= 0:
        return {"epochs": 0, "steps": 0}
    per_epoch = len(job.train_loader)
    if steps % per_epoch == 0:  # whole epochs: keep train()'s per-epoch log lines
        cfg = dataclasses.replace(job.train_cfg, epochs=steps // per_epoch)
        result = train(model, job.train_loader, cfg, hooks, desc)
    else:
        cfg = dataclasses.replace(job.train_cfg, epochs=1)
        result = train(model, StepLoader(job.train_loader, steps), cfg, hooks, desc)
    return {**result, "steps": steps}
