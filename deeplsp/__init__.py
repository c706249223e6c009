"""DeepLSP: latency-aware structured pruning of CNNs for edge devices.

Kept import-light on purpose: `deeplsp.errors` and `deeplsp.registry` are leaf
modules that every layer (devices, profiling, export, baselines) may import.
"""

__version__ = "0.1.0"
