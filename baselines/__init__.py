"""Baseline pruning methods: importing this package registers each in deeplsp.methods.METHODS."""

from baselines import (
    admm_pruner,  # noqa: F401
    growing_regularization,  # noqa: F401
    hybrid_pruner,  # noqa: F401
    l1_structured_pruning,  # noqa: F401
    learnable_threshold,  # noqa: F401
    loss_model_pruner,  # noqa: F401
    network_pruner,  # noqa: F401
    snip,  # noqa: F401
    structured_pruning,  # noqa: F401
    weight_to_node_pruning,  # noqa: F401
)
