"""Small torch helpers shared by export and profiling (a leaf module: no imports of ours
but `deeplsp.errors`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from deeplsp.errors import DeepLSPError


def check_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """An input shape as a tuple of positive ints, or a one-line user error."""
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise DeepLSPError(f"input shape must be a tuple of ints (got {input_shape!r})") from None
    if not shape or any(d < 1 for d in shape):
        raise DeepLSPError(f"input shape must be non-empty with positive sizes (got {shape})")
    return shape


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then each module's own train/eval flag back."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training
