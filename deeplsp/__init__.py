"""DeepLSP: latency-aware structured pruning of CNNs for edge devices.

Kept import-light on purpose: `deeplsp.errors` and `deeplsp.registry` are leaf
modules that every layer (devices, profiling, export, baselines) may import.
"""

__version__ = "0.1.0"


def prune(**settings: object) -> dict:
    """Python API of `deeplsp prune`: `deeplsp.prune(model=..., dataset=..., out=...,
    budget_ms=...)` with the fields of `deeplsp.pruner.PruneConfig`; returns the report."""
    from deeplsp.pruner import PruneConfig
    from deeplsp.pruner import prune as run

    return run(PruneConfig(**settings))
