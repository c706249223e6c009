"""Latency regression tests: measure a suite of models on a device and compare them with
a committed baseline.

Absolute latencies do not survive a noisy or different machine, so every model is
timed as a ratio to a reference model measured in the same run: the suite is timed in
`rounds` interleaved rounds (the order rotated each round, so no model always runs
first), each round gives every model's latency / the reference's latency of that same
round, and a model's figure is the median of its ratios. Load on the machine slows
both sides of a ratio alike, so it cancels where absolute medians would drift.

A suite is a TOML file:

    reference = "resnet18"          # the model every ratio is taken against
    rounds = 7                      # interleaved rounds (median of their ratios)
    warmup = 10                     # per model and round
    iters = 30
    tolerance = 0.15                # a ratio this much above the baseline's fails
    foreign_tolerance = 0.30        # ...when the baseline was taken on other hardware
    threads = 1                     # optional: pin ONNX Runtime's threads (cpu)
    baseline_runs = 3               # --update records the median of this many runs

    [[model]]
    name = "resnet18"
    model = "resnet18"              # a registered architecture ...
    dataset = "fashionmnist"        # ... built for this dataset's input and classes
    keep = 1.0                      # optional: keep this fraction of every channel group

    [[model]]
    name = "mine"
    onnx = "models/mine.onnx"       # or a file (relative to the suite)

Registered models are built with fixed-seed weights, pruned for real with DeepLSP's
structural removal and exported with its exporter, so a change there that slows the
delivered networks shows up here.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from deeplsp import __version__
from deeplsp.atomic import write_json
from deeplsp.errors import DeepLSPError, first_line
from devices import DeviceSpec
from profiling.runner import LatencyStats

try:
    import tomllib
except ImportError:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

MeasureMany = Callable[[DeviceSpec, Sequence[Path], int, int], Iterator[LatencyStats]]


@dataclass(frozen=True)
class SuiteModel:
    name: str
    model: str | None = None
    dataset: str | None = None
    keep: float = 1.0
    onnx: str | None = None


@dataclass(frozen=True)
class Suite:
    path: Path
    reference: str
    models: tuple[SuiteModel, ...]
    rounds: int = 7
    warmup: int = 10
    iters: int = 30
    tolerance: float = 0.15
    foreign_tolerance: float = 0.30
    threads: int | None = None
    baseline_runs: int = 3  # --update records the median of this many runs


def _bad(path: Path, what: str) -> DeepLSPError:
    return DeepLSPError(f"suite {path}: {what}")


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite file; every mistake is a one-line error naming the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise DeepLSPError(f"cannot read suite {path}: {first_line(exc)}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise _bad(path, f"not valid TOML: {first_line(exc)}") from exc
    entries = raw.pop("model", [])
    if not entries:
        raise _bad(path, "no [[model]] entries")
    models = []
    known = {f.name for f in SuiteModel.__dataclass_fields__.values()}
    for e in entries:
        unknown = set(e) - known
        if unknown:
            raise _bad(
                path, f"unknown key {sorted(unknown)[0]!r} in a [[model]]; use {sorted(known)}"
            )
        if "name" not in e:
            raise _bad(path, "every [[model]] needs a name")
        m = SuiteModel(**e)
        if (m.onnx is None) == (m.model is None):
            raise _bad(path, f"model {m.name!r}: give either onnx = FILE or model = NAME")
        if m.model is not None and m.dataset is None:
            raise _bad(path, f"model {m.name!r}: a registered model needs dataset = NAME")
        if not 0 < m.keep <= 1:
            raise _bad(path, f"model {m.name!r}: keep must be in (0, 1] (got {m.keep})")
        models.append(m)
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise _bad(path, "model names must be unique")
    settings = {f: raw.pop(f) for f in list(raw) if f in Suite.__dataclass_fields__}
    if raw:
        raise _bad(path, f"unknown setting {sorted(raw)[0]!r}")
    suite = Suite(path=path, models=tuple(models), **settings)
    if suite.reference not in names:
        raise _bad(path, f"reference {suite.reference!r} is not one of the models {names}")
    if suite.rounds < 3 or suite.iters < 1 or suite.warmup < 0 or suite.baseline_runs < 1:
        raise _bad(
            path, "rounds must be >= 3 (a median of ratios), iters and baseline_runs >= 1, "
            "warmup >= 0"
        )  # fmt: skip
    if not 0 < suite.tolerance <= suite.foreign_tolerance:
        raise _bad(path, "need 0 < tolerance <= foreign_tolerance")
    return suite


def export_model(m: SuiteModel, suite: Suite, device: DeviceSpec, workdir: Path) -> Path:
    """The ONNX file of a suite model: its own file, or a registered model built, pruned
    and exported by DeepLSP into `workdir` (reused there if already exported)."""
    if m.onnx is not None:
        path = (suite.path.parent / m.onnx).resolve()
        if not path.is_file():
            raise _bad(suite.path, f"model {m.name!r}: {path} does not exist")
        return path
    import torch

    from deeplsp.datasets import get_dataset
    from deeplsp.models import build_model, input_shape
    from deeplsp.structure import find_groups, prune_groups, round_channels
    from export import export_onnx

    build = get_dataset(m.dataset).model_args()
    shape = (device.batch, *input_shape(build))
    key = json.dumps([asdict(m), shape, device.channel_multiple, __version__], sort_keys=True)
    path = workdir / f"{m.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.onnx"
    if path.is_file():
        return path
    torch.manual_seed(0)
    model = build_model(m.model, **build).eval()
    if m.keep < 1:
        keep = {
            g.id: round_channels(g.channels, m.keep, device.channel_multiple)
            for g in find_groups(model, shape)
        }
        prune_groups(model, shape, keep)
    export_onnx(model, shape, path)
    return path


@dataclass
class SuiteResult:
    device: str
    fingerprint: dict
    reference: str
    rounds: int
    # name -> {"ratio": median ratio, "ratios": per round, "latency_ms": median of medians}
    models: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0


def _measure(device: DeviceSpec, paths: Sequence[Path], warmup: int, iters: int):
    from profiling import target

    return target.measure_many(device, paths, warmup, iters)


def measure_suite(
    suite: Suite,
    device: DeviceSpec,
    workdir: Path,
    measure_many: MeasureMany | None = None,  # default: profiling.target.measure_many
    fingerprint: dict | None = None,
    log: Callable[[str], None] = print,
) -> SuiteResult:
    """Time every model in interleaved rounds; ratios to the reference of the same round."""
    t0 = time.perf_counter()
    measure_many = measure_many or _measure
    if suite.threads is not None:
        device = replace(device, threads=suite.threads)
    if fingerprint is None:
        from profiling import target

        fingerprint = target.fingerprint(device)
    workdir.mkdir(parents=True, exist_ok=True)
    files = {m.name: export_model(m, suite, device, workdir) for m in suite.models}
    names = list(files)
    log(f"measuring {len(names)} models x {suite.rounds} rounds on {device.name}")
    # Every round in one measuring call (one process on the cpu device), each round
    # starting one model later so none is always first. A process per round was tried
    # and was no steadier run to run (bench/results/latency_regress.md).
    order = [names[(r + i) % len(names)] for r in range(suite.rounds) for i in range(len(names))]
    times: dict[str, list[float]] = {n: [] for n in names}
    stream = measure_many(device, [files[n] for n in order], suite.warmup, suite.iters)
    for name, stats in zip(order, stream, strict=True):
        times[name].append(stats.median)
    ref = times[suite.reference]
    result = SuiteResult(device.name, fingerprint, suite.reference, suite.rounds)
    for n in names:
        ratios = [t / rt for t, rt in zip(times[n], ref, strict=True)]
        result.models[n] = {
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "latency_ms": statistics.median(times[n]),
        }
    result.seconds = time.perf_counter() - t0
    return result


@dataclass(frozen=True)
class Verdict:
    name: str
    status: str  # "ok", "REGRESSED", "faster", "new", "missing"
    ratio: float | None
    baseline_ratio: float | None
    change: float | None  # ratio / baseline_ratio - 1
    latency_ms: float | None


def compare(result: SuiteResult, baseline: dict, tolerance: float) -> list[Verdict]:
    """Each model's ratio against the baseline's; slower beyond `tolerance` regresses."""
    if baseline.get("reference") != result.reference:
        raise DeepLSPError(
            f"the baseline's reference model is {baseline.get('reference')!r}, the suite's "
            f"{result.reference!r}; re-record the baseline with --update"
        )
    verdicts = []
    base = baseline.get("models", {})
    for name, r in result.models.items():
        if name not in base:
            verdicts.append(Verdict(name, "new", r["ratio"], None, None, r["latency_ms"]))
            continue
        b = base[name]["ratio"]
        change = r["ratio"] / b - 1
        status = "REGRESSED" if change > tolerance else "faster" if change < -tolerance else "ok"
        verdicts.append(Verdict(name, status, r["ratio"], b, change, r["latency_ms"]))
    for name in base.keys() - result.models.keys():
        verdicts.append(Verdict(name, "missing", None, base[name]["ratio"], None, None))
    return verdicts


def baseline_of(result: SuiteResult) -> dict:
    return {
        "deeplsp": __version__,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": result.device,
        "fingerprint": result.fingerprint,
        "reference": result.reference,
        "rounds": result.rounds,
        "models": {
            n: {"ratio": round(r["ratio"], 4), "latency_ms": round(r["latency_ms"], 4)}
            for n, r in result.models.items()
        },
    }


def default_baseline(suite_path: Path, device: str) -> Path:
    return suite_path.parent / f"baseline-{device}.json"


@dataclass
class RegressReport:
    result: SuiteResult
    baseline_path: Path
    updated: bool
    tolerance: float | None = None
    same_hardware: bool | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    confirmation: SuiteResult | None = None  # the second run, when the first regressed

    @property
    def regressed(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status == "REGRESSED"]

    def table(self) -> str:
        from tabulate import tabulate

        def pct(x: float | None) -> str:
            return "-" if x is None else f"{x:+.1%}"

        def num(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"

        rows = [
            (
                v.name,
                num(v.latency_ms),
                num(v.ratio),
                num(v.baseline_ratio),
                pct(v.change),
                v.status,
            )
            for v in self.verdicts
        ]
        headers = ("model", "median ms", "ratio", "baseline ratio", "change", "status")
        return tabulate(rows, headers=headers, tablefmt="github")

    def to_dict(self) -> dict:
        return {
            "result": asdict(self.result),
            "baseline": str(self.baseline_path),
            "updated": self.updated,
            "tolerance": self.tolerance,
            "same_hardware": self.same_hardware,
            "verdicts": [asdict(v) for v in self.verdicts],
            "regressed": [v.name for v in self.regressed],
            "confirmation": asdict(self.confirmation) if self.confirmation else None,
        }


def run_regress(
    suite_path: str | Path,
    device: DeviceSpec,
    baseline_path: str | Path | None = None,
    *,
    update: bool = False,
    tolerance: float | None = None,
    workdir: str | Path | None = None,
    measure_many: MeasureMany | None = None,  # default: profiling.target.measure_many
    fingerprint: dict | None = None,
    log: Callable[[str], None] = print,
) -> RegressReport:
    """Measure the suite; with `update` (or no baseline yet, when asked) record the
    baseline, otherwise compare with it."""
    suite = load_suite(suite_path)
    baseline_path = Path(baseline_path or default_baseline(suite.path, device.name))
    if not update and not baseline_path.is_file():
        raise DeepLSPError(
            f"no baseline {baseline_path} for device {device.name!r}; record one on the "
            f"device with `deeplsp regress {suite.path} --device {device.name} --update`"
        )
    with tempfile.TemporaryDirectory(prefix="deeplsp-regress-") as tmp:
        # exported afresh by default: the exporter and the pruner are under test too
        folder = Path(workdir) if workdir is not None else Path(tmp)
        report = _measure_and_compare(
            suite, device, baseline_path, folder, update, tolerance, measure_many, fingerprint, log
        )
    return report


def _measure_and_compare(
    suite, device, baseline_path, workdir, update, tolerance, measure_many, fingerprint, log
) -> RegressReport:
    result = measure_suite(suite, device, workdir, measure_many, fingerprint, log)
    if update:
        # The middle of several runs: a baseline from one run at the edge of the
        # machine's drift would make every later run look regressed (seen here: 0.223
        # recorded, 0.24-0.27 read for hours after).
        runs = [result] + [
            measure_suite(suite, device, workdir, measure_many, fingerprint, log)
            for _ in range(suite.baseline_runs - 1)
        ]
        result = middle_of(runs)
        write_json(baseline_path, baseline_of(result))
        report = RegressReport(result, baseline_path, updated=True)
        report.verdicts = [
            Verdict(n, "recorded", r["ratio"], None, None, r["latency_ms"])
            for n, r in result.models.items()
        ]
        return report
    try:
        baseline = json.loads(baseline_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DeepLSPError(f"baseline {baseline_path} is unreadable: {first_line(exc)}") from exc
    same = baseline.get("fingerprint", {}).get("id") == result.fingerprint.get("id")
    if tolerance is None:
        tolerance = suite.tolerance if same else suite.foreign_tolerance
    verdicts = compare(result, baseline, tolerance)
    confirmation = None
    if any(v.status == "REGRESSED" for v in verdicts):
        # A slow-down must show twice: on this kind of machine one whole run now and then
        # measures 15-30% off (bench/results/latency_regress.md), a real regression never
        # goes away. The run that is kinder to each model decides.
        log("a ratio is beyond the tolerance; measuring the suite again to confirm")
        confirmation = measure_suite(suite, device, workdir, measure_many, fingerprint, log)
        result = kinder_of(result, confirmation)
        verdicts = compare(result, baseline, tolerance)
    report = RegressReport(result, baseline_path, False, tolerance, same, verdicts)
    report.confirmation = confirmation
    return report


def _per_model(runs: list[SuiteResult], rank: int) -> SuiteResult:
    """Per model, the run whose ratio ranks `rank` from the lowest (every run's ratio
    kept in `runs`)."""
    first = runs[0]
    merged = SuiteResult(
        first.device, first.fingerprint, first.reference, first.rounds,
        seconds=sum(r.seconds for r in runs),
    )  # fmt: skip
    for name in first.models:
        ranked = sorted((r.models[name] for r in runs), key=lambda m: m["ratio"])
        merged.models[name] = dict(ranked[rank])
        merged.models[name]["runs"] = [r.models[name]["ratio"] for r in runs]
    return merged


def middle_of(runs: list[SuiteResult]) -> SuiteResult:
    """Per model, the run with the median ratio."""
    return _per_model(runs, len(runs) // 2)


def kinder_of(first: SuiteResult, second: SuiteResult) -> SuiteResult:
    """Per model, the run with the lower ratio."""
    return _per_model([first, second], 0)
