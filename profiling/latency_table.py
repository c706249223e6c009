"""Per-layer latency lookup table for a target device, cached in SQLite.

DeepLSP predicts a candidate network's latency as the sum of its layers'
latencies. Latency is a staircase in channel count (SIMD widths, tiles), so
each layer shape is *measured* on the device with the device's runtime, once,
and kept in a cache keyed by the device fingerprint. A layer is timed as it runs
inside a network: with the activation fused into it and, with ONNX Runtime, by its
kernel time alone (`HARNESS`). `Calibration` then maps the table sum onto a few
end-to-end measurements (the nodes no layer owns: squeeze-excitation means and
products, layout conversions around them; memory traffic between layers).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from tqdm import tqdm

from deeplsp.errors import DeepLSPError, first_line
from devices import DeviceSpec
from profiling import target
from profiling.runner import LatencyStats

KINDS = ("conv", "linear")
SINK = "GlobalAveragePool"  # what a conv layer's file ends with (see layer_onnx)
# What a one-layer file runs only because the layer runs alone: ONNX Runtime's layout
# conversions into and out of its blocked (NCHWc) layout, and the sink. Not timed where
# kernels are (profiling.target.measure_layers): inside a network the convolutions pass
# the blocked layout to each other.
HARNESS = ("ReorderInput", "ReorderOutput", SINK)
LAYER_FILES = 2  # the version of layer_onnx's files: 2 added the activation and the sink
# The activation a layer's output goes through, as ONNX Runtime fuses it into the layer's
# kernel: timed with it, since in MobileNetV3-L a convolution followed by hard-swish took
# 1.2-1.9x the time of the bare convolution inside the network (bench/README.md,
# layer_context). torch module -> name in the cache key.
ACTIVATIONS = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Sigmoid: "sigmoid",
    nn.SiLU: "silu",
}
OPSET = 18
IR_VERSION = 8  # the IR of opset 18: loadable by every ONNX Runtime that runs opset 18


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int or a pair of ints as a pair of ints, so equal signatures hash equal."""
    try:
        pair = (value, value) if isinstance(value, int | np.integer) else tuple(value)
        if len(pair) != 2 or any(isinstance(v, bool) or int(v) != v for v in pair):
            raise ValueError
    except (TypeError, ValueError):
        raise DeepLSPError(f"{name} must be an int or a pair of ints (got {value!r})") from None
    return int(pair[0]), int(pair[1])


@dataclass(frozen=True)
class LayerSig:
    """Everything that determines one layer's latency on a device.

    Validated on construction, so an impossible layer cannot reach the cache.
    A linear layer has no kernel, stride, padding, groups or spatial size: they
    must stay at their defaults.
    """

    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1
    in_hw: tuple[int, int] = (1, 1)  # input height, width (linear: (1, 1))
    batch: int = 1
    act: str = ""  # the activation applied to the output ("": none); see ACTIVATIONS

    def __post_init__(self) -> None:
        for name in ("kernel", "stride", "padding", "in_hw"):
            object.__setattr__(self, name, _pair(getattr(self, name), name))
        for name in ("in_channels", "out_channels", "groups", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise DeepLSPError(f"{name} must be an int (got {value!r})")
            object.__setattr__(self, name, int(value))
        self._validate()

    def _validate(self) -> None:
        if self.kind not in KINDS:
            raise DeepLSPError(f"layer kind must be one of {', '.join(KINDS)} (got {self.kind!r})")
        if self.act != "" and self.act not in ACTIVATIONS.values():
            raise DeepLSPError(
                f"activation must be one of {', '.join(ACTIVATIONS.values())} or empty "
                f"(got {self.act!r})"
            )
        sizes = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "groups": self.groups,
            "batch": self.batch,
            "kernel": min(self.kernel),
            "stride": min(self.stride),
            "in_hw": min(self.in_hw),
        }
        for name, value in sizes.items():
            if value < 1:
                raise DeepLSPError(f"{name} must be positive in {self}")
        if min(self.padding) < 0:
            raise DeepLSPError(f"padding must be >= 0 in {self}")
        if self.kind == "linear":
            default = LayerSig.__dataclass_fields__
            for name in ("kernel", "stride", "padding", "groups", "in_hw"):
                if getattr(self, name) != default[name].default:
                    raise DeepLSPError(f"a linear layer has no {name}; leave it at its default")
            return
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise DeepLSPError(
                f"in_channels {self.in_channels} and out_channels {self.out_channels} must both "
                f"be divisible by groups {self.groups}"
            )
        out_hw = self.out_hw
        if min(out_hw) < 1:
            raise DeepLSPError(f"output spatial size {out_hw} is empty for {self.key()}")

    @property
    def out_hw(self) -> tuple[int, int]:
        """Output height, width (floor mode, as Conv2d and ONNX Conv compute it)."""
        return tuple(  # type: ignore[return-value]
            (size + 2 * pad - k) // s + 1
            for size, pad, k, s in zip(
                self.in_hw, self.padding, self.kernel, self.stride, strict=True
            )
        )

    @property
    def weights(self) -> int:
        """Weight elements (bias included): what an inference reads from memory for it."""
        if self.kind == "linear":
            return self.out_channels * (self.in_channels + 1)
        kh, kw = self.kernel
        return self.out_channels * (self.in_channels // self.groups * kh * kw + 1)

    @property
    def is_depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.in_channels

    def key(self) -> str:
        """Stable, human-readable cache key; every field that changes latency is in it."""
        act = f"/{self.act}" if self.act else ""
        if self.kind == "linear":
            return f"linear/i{self.in_channels}/o{self.out_channels}/b{self.batch}{act}"
        k, s, p, hw = self.kernel, self.stride, self.padding, self.in_hw
        return (
            f"conv/i{self.in_channels}/o{self.out_channels}/k{k[0]}x{k[1]}/s{s[0]}x{s[1]}"
            f"/p{p[0]}x{p[1]}/g{self.groups}/hw{hw[0]}x{hw[1]}/b{self.batch}{act}"
        )

    def with_channels(self, in_channels: int, out_channels: int) -> LayerSig:
        """The same layer pruned to other channel counts.

        A depthwise conv (groups == in_channels > 1) stays depthwise: groups
        follows in_channels. Other grouped convs keep their groups.
        """
        groups = in_channels if self.is_depthwise else self.groups
        return LayerSig(
            self.kind,
            in_channels,
            out_channels,
            self.kernel,
            self.stride,
            self.padding,
            groups,
            self.in_hw,
            self.batch,
            self.act,
        )

    @classmethod
    def from_module(
        cls, module: nn.Module, input_shape: tuple[int, ...], act: str = ""
    ) -> LayerSig:
        """The signature of an nn.Conv2d / nn.Linear given its input shape (N, C, H, W) / (N, F)
        and the activation its output goes through (`act`)."""
        try:
            shape = tuple(int(d) for d in input_shape)
        except (TypeError, ValueError):
            raise DeepLSPError(
                f"input shape must be a tuple of ints (got {input_shape!r})"
            ) from None
        if isinstance(module, nn.Conv2d):
            if len(shape) != 4:
                raise DeepLSPError(f"a Conv2d input must be (N, C, H, W) (got {shape})")
            if shape[1] != module.in_channels:
                raise DeepLSPError(
                    f"input has {shape[1]} channels but the Conv2d takes {module.in_channels}"
                )
            if tuple(module.dilation) != (1, 1):
                raise DeepLSPError(f"dilated convolutions are not supported ({module})")
            if module.padding_mode != "zeros":
                raise DeepLSPError(f"only zero padding is supported ({module})")
            padding = module.padding
            if isinstance(padding, str):  # "valid" or "same"
                pads = module._reversed_padding_repeated_twice  # (wl, wr, hl, hr)
                if pads[0] != pads[1] or pads[2] != pads[3]:
                    raise DeepLSPError(f"asymmetric 'same' padding is not supported ({module})")
                padding = (pads[2], pads[0])
            return cls(
                "conv",
                module.in_channels,
                module.out_channels,
                tuple(module.kernel_size),
                tuple(module.stride),
                tuple(padding),
                module.groups,
                (shape[2], shape[3]),
                shape[0],
                act,
            )
        if isinstance(module, nn.Linear):
            if len(shape) < 2 or shape[-1] != module.in_features:
                raise DeepLSPError(
                    f"a Linear input must be (N, {module.in_features}) (got {shape})"
                )
            return cls(
                "linear",
                module.in_features,
                module.out_features,
                batch=math.prod(shape[:-1]),
                act=act,
            )
        raise DeepLSPError(
            f"the latency table knows nn.Conv2d and nn.Linear layers, not {type(module).__name__}"
        )


# Modules an activation can follow a layer through: at inference they do not touch it
# (dropout), or ONNX Runtime folds them into the layer (batch norm).
_PASS_THROUGH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Identity)


def activation_after(calls: Sequence[tuple[str, nn.Module]], name: str) -> str:
    """The activation (a value of ACTIVATIONS, or "") that the output of the module called
    `name` goes through, from the modules a forward pass called, in order: the first one
    after it that is not a pass-through. Functional activations are not seen ("")."""
    names = [n for n, _ in calls]
    if name not in names:
        raise DeepLSPError(f"{name!r} was not called in the forward pass")
    for _, module in calls[names.index(name) + 1 :]:
        if not isinstance(module, _PASS_THROUGH):
            return ACTIVATIONS.get(type(module), "")
    return ""


def layer_onnx(sig: LayerSig, seed: int = 0, repeat: int = 1) -> bytes:
    """An ONNX model of `sig` (Conv or Gemm, with bias, then its activation) to time on the
    device; with `repeat`, that many copies of the layer in a row, each with its own
    weights (a convolution whose output has its input's shape), which is how
    `profiling.weight_spill` finds where a network's weights outgrow the cache.

    Built with onnx.helper rather than a torch export: thousands of shapes are
    measured, and this takes milliseconds. Weights are seeded random float32 so
    no runtime can shortcut zeros.
    """
    sig._validate()
    if repeat < 1:
        raise DeepLSPError(f"repeat must be >= 1 (got {repeat})")
    if repeat > 1 and (
        sig.kind != "conv" or sig.out_channels != sig.in_channels or sig.out_hw != sig.in_hw
    ):
        raise DeepLSPError(
            f"only a convolution whose output has its input's shape can be repeated "
            f"(got {sig.key()})"
        )
    rng = np.random.default_rng(seed)
    if sig.kind == "conv":
        kh, kw = sig.kernel
        w_shape = (sig.out_channels, sig.in_channels // sig.groups, kh, kw)
        in_shape = [sig.batch, sig.in_channels, *sig.in_hw]
        out_shape = [sig.batch, sig.out_channels, *sig.out_hw]
        attrs = {
            "kernel_shape": [kh, kw],
            "strides": list(sig.stride),
            "pads": [sig.padding[0], sig.padding[1], sig.padding[0], sig.padding[1]],
            "dilations": [1, 1],
            "group": sig.groups,
        }
        op, fan_in = "Conv", sig.in_channels // sig.groups * kh * kw
    else:
        w_shape = (sig.out_channels, sig.in_channels)
        in_shape = [sig.batch, sig.in_channels]
        out_shape = [sig.batch, sig.out_channels]
        attrs = {"transB": 1}
        op, fan_in = "Gemm", sig.in_channels
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    x = "input"
    for i in range(repeat):
        n = str(i) if i else ""  # the single layer's names as they always were
        bias = rng.standard_normal(sig.out_channels).astype(np.float32)
        weight = (rng.standard_normal(w_shape) / math.sqrt(fan_in)).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"weight{n}"),
            numpy_helper.from_array(bias, f"bias{n}"),
        ]
        nodes.append(helper.make_node(op, [x, f"weight{n}", f"bias{n}"], [f"layer{n}"], **attrs))
        act_nodes, act_constants = _activation(sig.act, f"layer{n}", f"activated{n}", n)
        nodes += act_nodes
        initializers += act_constants
        x = nodes[-1].output[0]
    if sig.kind == "conv":
        # ONNX Runtime fuses an activation into the convolution only when the activation's
        # output stays in its blocked layout, as it does in a network; at the graph output it
        # runs apart (hard-swish as two more passes). A global average pool keeps it inside.
        nodes.append(helper.make_node(SINK, [x], ["output"]))
        out_shape = [sig.batch, sig.out_channels, 1, 1]
    else:
        nodes[-1].output[0] = "output"
    graph = helper.make_graph(
        nodes,
        sig.key().replace("/", "_") + (f"_x{repeat}" if repeat > 1 else ""),
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


# One-node activations as torch exports them (opset 18); relu6 and silu are built apart.
_ACTIVATION_OPS = {
    "relu": ("Relu", {}),
    "hardswish": ("HardSwish", {}),
    "hardsigmoid": ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}),
    "sigmoid": ("Sigmoid", {}),
}


def _activation(
    act: str, x: str, y: str, suffix: str = ""
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The ONNX nodes torch exports for `act`, from `x` to `y`, and their constants (their
    names end in `suffix`)."""
    if not act:
        return [], []
    if act == "relu6":
        bounds = [
            numpy_helper.from_array(np.array(0.0, np.float32), f"clip_min{suffix}"),
            numpy_helper.from_array(np.array(6.0, np.float32), f"clip_max{suffix}"),
        ]
        return [
            helper.make_node("Clip", [x, f"clip_min{suffix}", f"clip_max{suffix}"], [y])
        ], bounds
    if act == "silu":  # x * sigmoid(x)
        return [
            helper.make_node("Sigmoid", [x], [f"gate{suffix}"]),
            helper.make_node("Mul", [x, f"gate{suffix}"], [y]),
        ], []
    op, attrs = _ACTIVATION_OPS[act]
    return [helper.make_node(op, [x], [y], **attrs)], []


def default_cache_path() -> Path:
    """$DEEPLSP_CACHE_DIR/latency.sqlite, else ~/.cache/deeplsp/latency.sqlite."""
    root = os.environ.get("DEEPLSP_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "deeplsp"
    return base / "latency.sqlite"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS latency (
    fingerprint TEXT, signature TEXT, median_ms REAL, p90_ms REAL, n INTEGER, measured_at TEXT,
    PRIMARY KEY (fingerprint, signature)
);
CREATE TABLE IF NOT EXISTS devices (fingerprint TEXT PRIMARY KEY, info TEXT);
"""


class LatencyTable:
    """Measured per-layer latencies for one device, persisted across runs.

    Rows are keyed by (device fingerprint id, signature key), so a cache copied
    to another machine or runtime version is never reused by mistake.
    """

    def __init__(
        self,
        device: DeviceSpec,
        cache_path: str | Path | None = None,
        *,
        warmup: int = 10,
        # One layer's kernel time: 30 runs put 80% of MobileNetV3-L variants within 5% of
        # measured, 100 runs 92% (bench/README.md, layer_context).
        iters: int = 100,
        measure: Callable[[LayerSig], LatencyStats] | None = None,
        measure_network: Callable[[Path], LatencyStats] | None = None,
    ) -> None:
        if warmup < 0 or iters < 1:
            raise DeepLSPError(f"warmup must be >= 0 and iters >= 1 (got {warmup}, {iters})")
        self.device = device
        self.warmup = warmup
        self.iters = iters
        self.path = Path(cache_path) if cache_path is not None else default_cache_path()
        self._measure = measure
        self._measure_network = measure_network
        info = target.fingerprint(device)
        self.timing = target.layer_timing(device)
        # Rows of another layer file or way of timing it are other measurements.
        self.fingerprint: str = f"{info['id']}/layers-{LAYER_FILES}/{self.timing}"
        self._memo: dict[str, float] = {}  # by row key: a layer's `key()` or a network's name
        self._hits = 0
        self._misses = 0
        self._conn: sqlite3.Connection | None = None
        if self.path.exists() and not self.path.is_file():
            raise DeepLSPError(f"latency cache {self.path} exists but is not a file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DeepLSPError(
                f"cannot create the latency cache folder: {first_line(exc)}"
            ) from exc
        try:
            self._conn = sqlite3.connect(self.path, timeout=30.0)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(_SCHEMA)
            cols = [row[1] for row in self._conn.execute("PRAGMA table_info(latency)")]
            expected = ["fingerprint", "signature", "median_ms", "p90_ms", "n", "measured_at"]
            if cols != expected:
                raise sqlite3.DatabaseError(f"table 'latency' has columns {cols}, not {expected}")
            with self._conn:
                self._conn.execute(
                    "INSERT OR REPLACE INTO devices VALUES (?, ?)",
                    (self.fingerprint, json.dumps(info, sort_keys=True)),
                )
        except sqlite3.DatabaseError as exc:
            self.close()
            raise self._db_error(exc) from exc

    # -- lookups -------------------------------------------------------------
    def get(self, sig: LayerSig) -> float:
        """Median latency in ms of one layer; measured and stored on a miss."""
        if not isinstance(sig, LayerSig):
            raise DeepLSPError(f"expected a LayerSig, got {type(sig).__name__}")
        return self.get_many([sig])[sig]

    def get_many(
        self, sigs: Iterable[LayerSig], desc: str = "latency table"
    ) -> dict[LayerSig, float]:
        """Median ms per signature; measures only the missing ones, each once.

        Every measurement is committed as soon as it is taken, so an interrupted
        build (Ctrl-C included) keeps what it measured.
        """
        unique = list(dict.fromkeys(sigs))
        for sig in unique:
            if not isinstance(sig, LayerSig):
                raise DeepLSPError(f"expected a LayerSig, got {type(sig).__name__}")
        result = {sig: self._hit(sig.key()) for sig in unique if self._known(sig.key())}
        missing = [sig for sig in unique if sig not in result]
        interval = 0.5 if sys.stderr.isatty() else 30.0
        bar = tqdm(
            total=len(missing),
            desc=desc,
            unit="layer",
            leave=False,
            mininterval=interval,
            disable=len(missing) < 2,
        )
        try:
            for sig, stats in zip(missing, self._measure_stream(missing), strict=True):
                result[sig] = self._store(sig.key(), stats)
                bar.update()
        finally:
            bar.close()
        return {sig: result[sig] for sig in unique}

    def staircase(self, sig: LayerSig, out_channels: Iterable[int]) -> list[tuple[int, float]]:
        """Latency against output channel count, input channels fixed (depthwise: both follow).

        The plot of this is why the table is measured, not interpolated.
        """
        counts = [int(c) for c in out_channels]
        variants = [
            sig.with_channels(c if sig.is_depthwise else sig.in_channels, c) for c in counts
        ]
        table = self.get_many(variants, desc=f"staircase {sig.key()}")
        return [(c, table[v]) for c, v in zip(counts, variants, strict=True)]

    def networks(self, files: dict[str, Callable[[], bytes]], rounds: int = 3) -> dict[str, float]:
        """Median ms of whole ONNX files by name, timed as files (not by kernels), each the
        median of `rounds` timings taken in passes that alternate their order; measured
        once per device and stored beside the layers (a file is built only to be measured).
        Names must not look like layer keys."""
        for name in files:
            if name.split("/")[0] in KINDS:
                raise DeepLSPError(f"a network's name cannot start like a layer key: {name!r}")
        result = {n: self._hit(n) for n in files if self._known(n)}
        missing = [n for n in files if n not in result]
        if missing:
            timed: dict[str, list[LatencyStats]] = {n: [] for n in missing}
            with tempfile.TemporaryDirectory() as tmp:
                paths = {n: Path(tmp) / f"network{i}.onnx" for i, n in enumerate(missing)}
                for n, path in paths.items():
                    path.write_bytes(files[n]())
                for r in range(rounds):
                    order = missing if r % 2 == 0 else missing[::-1]
                    for n, stats in zip(
                        order,
                        self._measure_files([paths[n] for n in order]),
                        strict=True,
                    ):
                        timed[n].append(stats)
            for n in missing:
                result[n] = self._store(n, sorted(timed[n], key=lambda s: s.median)[rounds // 2])
        return {n: result[n] for n in files}

    @property
    def stats(self) -> dict:
        """Cache hits and misses of this object, and the layer rows stored for this device
        (the whole networks of `networks` are not layers)."""
        rows = self._query(
            "SELECT COUNT(*) FROM latency WHERE fingerprint = ? AND ("
            + " OR ".join("signature LIKE ?" for _ in KINDS)
            + ")",
            (self.fingerprint, *(f"{kind}/%" for kind in KINDS)),
        )[0][0]
        return {
            "hits": self._hits,
            "misses": self._misses,
            "rows": rows,
            "fingerprint": self.fingerprint,
            "path": str(self.path),
            "timing": self.timing,
        }

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> LatencyTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------
    def _known(self, key: str) -> bool:
        if key in self._memo:
            return True
        rows = self._query(
            "SELECT median_ms FROM latency WHERE fingerprint = ? AND signature = ?",
            (self.fingerprint, key),
        )
        if rows:
            self._memo[key] = float(rows[0][0])
        return bool(rows)

    def _hit(self, key: str) -> float:
        self._hits += 1
        return self._memo[key]

    def _store(self, key: str, stats: LatencyStats) -> float:
        if not (math.isfinite(stats.median) and stats.median >= 0):
            raise DeepLSPError(f"measured a latency of {stats.median} ms for {key}")
        row = (
            self.fingerprint,
            key,
            float(stats.median),
            float(stats.p90),
            int(stats.n),
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),  # UTC,
        )
        conn = self._connection()
        try:
            with conn:  # one commit per row: an interrupted build keeps what it measured
                conn.execute("INSERT OR REPLACE INTO latency VALUES (?, ?, ?, ?, ?, ?)", row)
        except sqlite3.DatabaseError as exc:
            raise self._db_error(exc) from exc
        self._misses += 1
        self._memo[key] = float(stats.median)
        return self._memo[key]

    def _measure_stream(self, sigs: list[LayerSig]) -> Iterator[LatencyStats]:
        """Each signature's stats in order, as measured (so each can be stored at once)."""
        if self._measure is not None:
            yield from map(self._measure, sigs)
        else:
            # one batch through the device (a single child process on the cpu device)
            with tempfile.TemporaryDirectory() as tmp:
                paths = []
                for i, sig in enumerate(sigs):
                    paths.append(Path(tmp) / f"layer{i}.onnx")
                    paths[-1].write_bytes(layer_onnx(sig))
                yield from target.measure_layers(
                    self.device, paths, self.warmup, self.iters, HARNESS
                )

    def _measure_files(self, paths: list[Path]) -> Iterator[LatencyStats]:
        if self._measure_network is not None:
            yield from map(self._measure_network, paths)
        else:
            yield from target.measure_many(self.device, paths, self.warmup, self.iters)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise DeepLSPError(f"the latency table on {self.path} is closed")
        return self._conn

    def _query(self, sql: str, params: tuple) -> list[tuple]:
        conn = self._connection()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._db_error(exc) from exc

    def _db_error(self, exc: BaseException) -> DeepLSPError:
        return DeepLSPError(
            f"latency cache {self.path} is unusable ({first_line(exc)}); it only holds "
            "measurements, so it can be deleted and will be rebuilt"
        )


@dataclass(frozen=True)
class Calibration:
    """Table sum -> measured end-to-end latency, from a few whole models measured.

    The table sum misses what only a whole network shows (the nodes no layer owns,
    cache reuse between layers).
    Predictions follow a monotone curve through the measured models, straight
    between neighbours in log-log (a power law per segment): on 50 random
    ResNet-18 variants it put 50% within +-10% of their measured latency with a
    median bias of +0.7%, where a least-squares line through the same three
    models (dense, middle, smallest) put 38% there, biased +16.7%
    (bench/results/latency_prediction-paired.json). `scale` and `offset` are that
    line, kept as a summary and for a single measured model.

    `smooth` fits instead of interpolating: a quadratic in log-log through the
    two end points (the largest and smallest sums), its bend fitted to the points
    between by least squares and limited so the curve never falls. With eight
    calibration networks, several of them random, interpolating chases each one's
    own scatter about the curve (see `calibrate` in deeplsp/pruner.py).
    """

    scale: float
    offset: float
    points: int
    max_rel_error: float
    # (table_sum_ms, measured_ms) pairs the line was fitted on, kept so it can be refitted.
    fit_points: tuple[tuple[float, float], ...] = field(default=(), repr=False)
    smooth: bool = False

    @classmethod
    def fit(
        cls, table_sums_ms: Sequence[float], measured_ms: Sequence[float], smooth: bool = False
    ) -> Calibration:
        """Least squares; one point gives a pure ratio; never a non-positive scale."""
        if len(table_sums_ms) != len(measured_ms):
            raise DeepLSPError(
                f"{len(table_sums_ms)} table sums but {len(measured_ms)} measurements"
            )
        if len(table_sums_ms) < 1:
            raise DeepLSPError("calibration needs at least one measured model")
        xs = np.asarray(table_sums_ms, dtype=np.float64)
        ys = np.asarray(measured_ms, dtype=np.float64)
        if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
            raise DeepLSPError("calibration latencies must be finite")
        if np.any(xs <= 0) or np.any(ys <= 0):
            raise DeepLSPError("calibration latencies must be positive")
        scale, offset = 0.0, 0.0
        var = float(np.sum((xs - xs.mean()) ** 2))
        if len(xs) > 1 and var > 1e-12 * float(np.sum(xs**2)):
            scale = float(np.sum((xs - xs.mean()) * (ys - ys.mean())) / var)
            offset = float(ys.mean() - scale * xs.mean())
        if not scale > 0:  # one point, equal sums, or a slope the wrong way: ratio of means
            scale, offset = float(ys.mean() / xs.mean()), 0.0
        rel = np.abs(scale * xs + offset - ys) / ys
        return cls(
            scale=scale,
            offset=offset,
            points=len(xs),
            max_rel_error=float(rel.max()),
            fit_points=tuple((float(x), float(y)) for x, y in zip(xs, ys, strict=True)),
            smooth=smooth,
        )

    def scaled(self, factor: float) -> Calibration:
        """The same curve with every prediction times `factor` (its measured points scaled):
        a curve put through one measured network it missed."""
        xs, ys = zip(*self.fit_points, strict=True)
        return Calibration.fit(xs, [factor * y for y in ys], smooth=self.smooth)

    def _curve(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(log table sum, log ms) knots, non-decreasing; None below two distinct sums."""
        by_sum: dict[float, list[float]] = {}
        for x, y in self.fit_points:
            by_sum.setdefault(x, []).append(math.log(y))
        if len(by_sum) < 2:
            return None
        xs = sorted(by_sum)
        # pool adjacent violators: a bigger network measured faster is noise, not shape
        blocks: list[list[float]] = []  # [sum of log ms, count]
        for x in xs:
            blocks.append([sum(by_sum[x]), len(by_sum[x]), 1])
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
                last = blocks.pop()
                blocks[-1] = [a + b for a, b in zip(blocks[-1], last, strict=True)]
        ly = [b[0] / b[1] for b in blocks for _ in range(b[2])]
        return np.log(xs), np.asarray(ly)

    def _bend(self) -> tuple[float, float, float, float, float] | None:
        """(lo, y at lo, hi, slope, bend) of the smooth curve in log-log, where log ms =
        y at lo + slope * (x - lo) + bend * (x - lo) * (x - hi); None where there is no
        point between the ends or the ends do not rise."""
        by_sum: dict[float, list[float]] = {}
        for x, y in self.fit_points:
            by_sum.setdefault(math.log(x), []).append(math.log(y))
        lx = sorted(by_sum)
        if len(lx) < 3:
            return None
        lo, hi = lx[0], lx[-1]
        ylo, yhi = (float(np.mean(by_sum[x])) for x in (lo, hi))
        slope = (yhi - ylo) / (hi - lo)
        if not slope > 0:
            return None
        inner = [(x, y) for x in lx[1:-1] for y in by_sum[x]]
        basis = np.array([(x - lo) * (x - hi) for x, _ in inner])
        resid = np.array([y - ylo - slope * (x - lo) for x, y in inner])
        bend = float(basis @ resid / (basis @ basis))
        limit = slope / (hi - lo)  # the slope at either end stays >= 0
        return lo, ylo, hi, slope, min(limit, max(-limit, bend))

    def predict(self, table_sum_ms: float) -> float:
        """Predicted end-to-end ms of a network whose layers sum to `table_sum_ms` in the table."""
        bent = self._bend() if self.smooth and table_sum_ms > 0 else None
        if bent is not None:
            x = math.log(table_sum_ms)
            lo, ylo, hi, slope, bend = bent
            end = min(hi, max(lo, x))  # beyond the ends: straight on, at the end's slope
            y = ylo + slope * (end - lo) + bend * (end - lo) * (end - hi)
            return math.exp(y + (slope + bend * (2 * end - lo - hi)) * (x - end))
        curve = self._curve()
        if curve is None or not table_sum_ms > 0:
            return self.scale * table_sum_ms + self.offset
        x = math.log(table_sum_ms)
        lx, ly = curve
        i = int(np.clip(np.searchsorted(lx, x) - 1, 0, len(lx) - 2))
        slope = (ly[i + 1] - ly[i]) / (lx[i + 1] - lx[i])
        return math.exp(ly[i] + slope * (x - lx[i]))

    def table_budget(self, ms: float) -> float:
        """The largest table sum predicted within `ms` (the knapsack's budget)."""
        curve = self._curve()
        if curve is None:
            return (ms - self.offset) / self.scale
        lo, hi = curve[0][0] - 20.0, curve[0][-1] + 20.0  # log table sums
        if self.predict(math.exp(lo)) > ms:
            return 0.0
        for _ in range(100):
            mid = (lo + hi) / 2
            if self.predict(math.exp(mid)) <= ms:
                lo = mid
            else:
                hi = mid
        return math.exp(lo)

    def to_dict(self) -> dict:
        return {
            "scale": self.scale,
            "offset": self.offset,
            "points": self.points,
            "max_rel_error": self.max_rel_error,
            "fit_points": [list(p) for p in self.fit_points],
            "smooth": self.smooth,
        }


def fit_weight_cost(
    curve: Sequence[tuple[float, int, float]],
    probes: Sequence[tuple[float, int, float]],
    cap: float | None = None,
) -> float:
    """Table ms per weight element that a layer costs inside a network but not alone.

    Timed alone, a layer reads the same weights run after run from cache; inside a
    network every layer's weights are read once per inference and the whole set
    outgrows the cache. On 50 random ResNet-18 variants (1 thread), the table sum
    alone put 82% within +-10% of their measured latency; the table sum plus a cost
    per weight, fitted on those variants, 96%.

    Each point is (table sum, weight elements, measured ms). The `curve` models
    (dense, middle, smallest: every group at one ratio) fix the calibration curve;
    the `probes` are networks whose weights differ from those of the curve's at the
    same table sum, and the cost chosen is the one under which the curve predicts
    them best (least squares in log). Searched on a grid from 0 to twice the first
    curve model's table sum over its weights, and to `cap` at most; 0 without probes.

    The cap is what the device's own chain of spilled weights costs
    (`profiling.weight_spill`): the tilted networks can be off the curve for reasons
    other than their weights. With two ONNX Runtime threads a ResNet-18's smallest
    networks ran at 0.6x their table sum, the fit read 0.76 ms per million weights, 9x
    the chain's 0.08, and its curve put the search's candidates 15-25% low; capped, 2%
    low to 10% high (one `make demo`, offline). With one thread the fit stayed under
    the cap (ResNet-18 0.148 against 0.195; MobileNetV3-L 0.03-0.08).
    """
    if not curve:
        raise DeepLSPError("fitting the weight cost needs at least one curve model")
    best, best_err = 0.0, math.inf
    grid = [float(f) * curve[0][0] / max(curve[0][1], 1) for f in np.linspace(0.0, 2.0, 201)]
    if cap is not None:
        grid = [c for c in grid if c < cap] + [cap]
    for cost in grid if probes else [0.0]:
        cal = Calibration.fit([t + cost * w for t, w, _ in curve], [m for _, _, m in curve])
        predicted = [cal.predict(t + cost * w) for t, w, _ in probes]
        if any(p <= 0 for p in predicted):
            continue
        err = sum(math.log(p / m) ** 2 for p, (_, _, m) in zip(predicted, probes, strict=True))
        if err < best_err - 1e-12:
            best, best_err = cost, err
    return best
