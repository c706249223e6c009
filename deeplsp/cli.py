"""The `deeplsp` command line.

Every user mistake ends as one line `deeplsp: error: ...` and exit code 2,
never a traceback. Heavy imports (torch) happen inside the commands that need
them, so `deeplsp devices` and `--help` start fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from deeplsp import __version__
from deeplsp.errors import DeepLSPError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line (the usage block is in --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- argument types: reject bad numbers at parse time with a one-line error --
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


for _fn, _name in (
    (_positive_int, "positive integer"),
    (_non_negative_int, "integer >= 0"),
    (_positive_float, "number > 0"),
    (_non_negative_float, "number >= 0"),
):
    _fn.__name__ = _name  # argparse names the type in "invalid <name> value"


# -- commands ----------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> None:
    from deeplsp.pipeline import train_dense
    from deeplsp.training import TrainConfig

    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        threads=args.threads,
        device=args.train_device,
    )
    out = args.out or Path("runs") / f"{args.model}-{args.dataset}" / "dense.pt"
    s = train_dense(
        args.model,
        args.dataset,
        out,
        cfg,
        data_dir=args.data_dir,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        pretrained=args.pretrained,
        download=args.download,
        workers=args.workers,
    )
    rows = [
        ("model", f"{s['model']} on {s['dataset']}"),
        ("train / test samples", f"{s['train_samples']} / {s['test_samples']}"),
        ("epochs", f"{s['train']['epochs']} on {s['train']['device']}"),
        ("test top-1 / top-5", f"{s['test']['top1']:.2%} / {s['test']['top5']:.2%}"),
        ("parameters", f"{s['cost']['params']:,}"),
        ("MACs (conv + linear)", f"{s['cost']['macs']:,}"),
        ("train time", f"{s['seconds']['train']:.1f} s"),
        ("checkpoint", s["checkpoint"]),
    ]
    _print_table(rows)
    if s["left_fresh"]:
        print(f"pretrained weights: left at fresh init: {', '.join(s['left_fresh'])}")


def cmd_export(args: argparse.Namespace) -> None:
    from deeplsp.pipeline import export_checkpoint

    out = args.out or Path(args.checkpoint).with_suffix(".onnx")
    if args.engine:  # fail on the device or its settings before the export work
        from profiling.target import engine_config

        args.device = args.device or "gpu"
        device = _device(args)
        config = engine_config(
            device, precision=args.precision, workspace_mb=args.workspace_mb, sparse=args.sparse
        )
    r = export_checkpoint(
        args.checkpoint,
        out,
        batch=args.batch,
        opset=args.opset,
        simplify=args.simplify,
        atol=args.atol,
    )
    _print_table(
        [
            ("onnx", str(r.path)),
            ("input shape", "x".join(map(str, r.input_shape))),
            ("exporter / opset", f"{r.exporter} / {r.opset}"),
            ("simplified", "yes" if r.simplified else "no"),
            ("size", f"{r.size_bytes / 1e6:.2f} MB"),
            ("max |torch - onnxruntime|", f"{r.max_abs_diff:.2e} (tolerance {r.atol:g})"),
        ]
    )
    if args.engine:
        _export_engine(args, device, config, r.path)


def _export_engine(args: argparse.Namespace, device, config, onnx_path: Path) -> None:
    """Build the TensorRT engine beside the ONNX file, on the device that will run it."""
    from profiling import target

    calibration = None
    if config.precision == "int8":
        from deeplsp.checkpoint import load_checkpoint
        from deeplsp.datasets import calibration_batches

        dataset = args.dataset or load_checkpoint(args.checkpoint).dataset
        if dataset is None:
            raise DeepLSPError("int8 calibration needs images: give --dataset NAME")
        batches = calibration_batches(
            dataset, args.data_dir, n_batches=args.calibration_batches, batch_size=args.batch
        )
        calibration = [x.numpy() for x, _ in batches if len(x) == args.batch]
    engine_path = onnx_path.with_suffix(".engine")
    where = f"the agent at {device.url}" if device.url else "this machine"
    print(f"building the {config.precision} TensorRT engine for {device.name} on {where}...")
    meta = target.build_engine(device, onnx_path, engine_path, calibration, config)
    _print_table(
        [
            ("engine", str(engine_path)),
            ("metadata", f"{engine_path}.json"),
            ("TensorRT / GPU", f"{meta['tensorrt_version']} / {meta['gpu']}"),
            ("precision", meta["precision"] + (" (2:4 sparse)" if meta.get("sparse") else "")),
            ("build time", f"{meta['build_seconds']:.1f} s"),
        ]
        + [("warning", w) for w in meta.get("warnings", [])]
    )


def _device(args: argparse.Namespace):
    """The device named by --device, reached through --device-url / env / config."""
    from devices import resolve_device

    return resolve_device(args.device, getattr(args, "device_url", None))


def _device_line(device, fp: dict) -> str:
    hw = fp.get("gpu") or fp.get("jetson") or fp.get("cpu") or "?"
    where = f" via {device.url}" if device.url else ""
    return f"{device.name}{where} ({hw}, id {fp['id']})"


def cmd_profile(args: argparse.Namespace) -> None:
    from profiling.profile import profile_onnx

    device = _device(args)
    if args.threads is not None:
        from dataclasses import replace

        device = replace(device, threads=args.threads)
    r = profile_onnx(args.model, device, warmup=args.warmup, iters=args.iters)
    lat = r["latency_ms"]
    runtime = " ".join(str(lat["settings"].get(k, "")) for k in ("runtime", "version")).strip()
    if lat["settings"].get("intra_op_threads"):
        runtime += f", {lat['settings']['intra_op_threads']} threads"
    rows = [
        ("model", r["model"]),
        ("device", _device_line(device, r["fingerprint"])),
        ("runtime", runtime or "?"),
        ("latency median / p90", f"{lat['median']:.3f} / {lat['p90']:.3f} ms"),
        ("latency mean ± std", f"{lat['mean']:.3f} ± {lat['std']:.3f} ms (n={lat['n']})"),
    ]
    if lat.get("copy_median") is not None:
        rows.append(("host<->device copies (median)", f"{lat['copy_median']:.3f} ms"))
    if r["cost"] is not None:
        rows += [
            ("MACs (conv + linear)", f"{r['cost']['macs']:,}"),
            ("weights in graph", f"{r['cost']['params']:,}"),
        ]
    rows.append(("file size", f"{r['size_bytes'] / 1e6:.2f} MB"))
    _print_table(rows)
    if args.json:
        from deeplsp.atomic import write_json

        write_json(args.json, r)
        print(f"wrote {args.json}")


def cmd_devices(args: argparse.Namespace) -> None:
    from profiling.target import device_statuses

    statuses = device_statuses(getattr(args, "device_url", None))
    rows = [
        (
            st.device.name,
            st.device.backend,
            st.device.precision,
            st.device.channel_multiple,
            st.device.url or st.device.location,
            st.status,
            st.fingerprint["id"] if st.fingerprint else "-",
            st.device.description,
        )
        for st in statuses
    ]
    headers = ("device", "backend", "precision", "channel multiple", "reached", "status",
               "fingerprint", "description")  # fmt: skip
    _print_table(rows, headers)
    if args.json:
        print(json.dumps([st.fingerprint for st in statuses if st.fingerprint], indent=2))


def cmd_agent_serve(args: argparse.Namespace) -> None:
    from devices import resolve_device
    from devices.config import detect_local_device
    from profiling.agent import load_agent_token, serve  # fastapi: only for this command

    token = load_agent_token(args.token_file)
    name = args.device or detect_local_device()
    device = resolve_device(name, config={})  # the agent's device is this machine
    if device.url is not None:
        raise DeepLSPError("unset DEEPLSP_DEVICE_URL: the agent measures its own device")
    if args.threads is not None:
        from dataclasses import replace

        device = replace(device, threads=args.threads)
    serve(
        device,
        args.host,
        args.port,
        token=token,
        max_upload_bytes=args.max_upload_mb << 20,
        max_queue=args.max_queue,
        measure_timeout_s=args.job_timeout_s,
    )


def cmd_agent_token(args: argparse.Namespace) -> None:
    from profiling.agent import generate_token

    token = generate_token()
    if args.out is None:
        print(token)
        return
    import os

    from deeplsp.atomic import atomic_path

    if args.out.exists() and not args.force:
        raise DeepLSPError(f"{args.out} exists; pass --force to replace the token")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        tmp.touch(mode=0o600)
        os.chmod(tmp, 0o600)  # before the token is in it
        tmp.write_text(token + "\n")
    print(f"wrote a new agent token to {args.out} (mode 600); copy it to the workstation")


def cmd_regress(args: argparse.Namespace) -> int:
    from deeplsp.regress import run_regress

    device = _device(args)
    report = run_regress(
        args.suite,
        device,
        args.baseline,
        update=args.update,
        tolerance=args.tolerance,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(report.table())
    if args.json:
        from deeplsp.atomic import write_json

        write_json(args.json, report.to_dict())
    if report.updated:
        print(f"recorded baseline {report.baseline_path} ({device.name})")
        return 0
    hw = "same hardware" if report.same_hardware else "baseline from other hardware"
    print(f"tolerance {report.tolerance:.0%} ({hw}); reference {report.result.reference}")
    if report.regressed:
        names = ", ".join(v.name for v in report.regressed)
        print(f"REGRESSION on {device.name}: {names}", file=sys.stderr)
        return 1
    return 0


def cmd_prune(args: argparse.Namespace) -> None:
    from deeplsp.pruner import PruneConfig, prune

    out = args.out or Path("runs") / f"{args.model}-{args.dataset}-{args.device}"
    cfg = PruneConfig(
        model=args.model,
        dataset=args.dataset,
        out=str(out),
        device=args.device,
        device_url=args.device_url,
        threads=args.threads,
        checkpoint=str(args.checkpoint) if args.checkpoint else None,
        budget_ms=args.budget_ms,
        budget_ratio=args.budget_ratio,
        keep_ratio=args.keep_ratio,
        latency_weight=args.latency_weight,
        importance=args.importance,
        selection=args.selection,
        sensitivity=args.sensitivity,
        allocation=args.allocation,
        amount=args.amount,
        finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr,
        dense_epochs=args.dense_epochs,
        quick=args.quick,
        data_dir=str(args.data_dir) if args.data_dir else None,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        max_iterations=args.max_iterations,
        climb=args.climb,
        guard=args.guard,
        short_images=args.short_images,
        timing=args.timing,
        seed=args.seed,
    )
    r = prune(cfg)
    d, p = r["dense"], r["pruned"]
    _print_table(
        [
            ("result", r["status"]),
            (
                "latency median / p90",
                f"{d['latency_ms']['median']:.3f} / "
                f"{d['latency_ms']['p90']:.3f} ms -> {p['latency_ms']['median']:.3f} / "
                f"{p['latency_ms']['p90']:.3f} ms",
            ),
            ("test top-1", f"{d['test']['top1']:.2%} -> {p['test']['top1']:.2%}"),
            ("MACs", f"{d['cost']['macs']:,} -> {p['cost']['macs']:,}"),
            ("parameters", f"{d['cost']['params']:,} -> {p['cost']['params']:,}"),
            ("report", str(out / "report.md")),
        ]
    )


def cmd_compare(args: argparse.Namespace) -> None:
    from deeplsp.compare import CompareConfig, run_compare

    overrides: dict[str, list[str]] = {}
    for item in args.set:
        method, dot, setting = item.partition(".")
        if not dot or "=" not in setting:
            raise DeepLSPError(
                f"--set expects METHOD.key=value, e.g. SNIP.sparsity=0.3 (got {item!r})"
            )
        overrides.setdefault(method, []).append(setting)
    if args.budget_ms is not None:
        overrides.setdefault("DeepLSP", []).append(f"budget_ms={args.budget_ms}")
    if args.keep_ratio is not None:
        overrides.setdefault("DeepLSP", []).append(f"keep_ratio={args.keep_ratio}")
    cfg = CompareConfig(
        model=args.model,
        datasets=args.datasets,
        out=str(args.out or Path("runs") / f"compare-{args.model}"),
        pruners=args.pruners.split(",") if args.pruners else None,
        device=args.device,
        device_url=args.device_url,
        quick=args.quick,
        epochs=args.epochs,
        dense_epochs=args.dense_epochs,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        data_dir=str(args.data_dir) if args.data_dir else None,
        overrides=overrides,
        retry_failed=args.retry_failed,
        seed=args.seed,
    )
    summary = run_compare(cfg)
    failed = [c for c in summary["cells"] if c.get("error")]
    print(f"results: {Path(cfg.out) / 'results.md'} ({len(failed)} failed cell(s))")


def cmd_models(args: argparse.Namespace) -> None:
    from deeplsp.models import MODELS

    _print_table([(m.name, m.description) for m in MODELS], ("model", "description"))


def cmd_datasets(args: argparse.Namespace) -> None:
    from deeplsp.datasets import DATASETS

    rows = [
        (d.name, d.num_classes, f"{d.in_channels}x{d.input_size}x{d.input_size}", d.description)
        for d in DATASETS
    ]
    _print_table(rows, ("dataset", "classes", "input", "description"))


def _print_table(rows: Sequence[Sequence], headers: Sequence[str] = ()) -> None:
    from tabulate import tabulate

    print(tabulate(rows, headers=headers, tablefmt="simple" if headers else "plain"))


# -- parser ------------------------------------------------------------------
def _add_device_url(p: argparse.ArgumentParser, what: str = "measure") -> None:
    p.add_argument(
        "--device-url",
        metavar="URL",
        help=f"{what} through the DeepLSP agent at URL (default: $DEEPLSP_DEVICE_URL, config)",
    )


def build_parser() -> argparse.ArgumentParser:
    # Names come from the registries; importing them costs a torch import, paid
    # only when a command that takes a model or dataset is parsed.
    from deeplsp.datasets import DATASETS
    from deeplsp.models import MODELS
    from devices import DEVICES

    p = _Parser(
        prog="deeplsp",
        description="Latency-aware pruning of CNNs for edge devices.",
    )
    p.add_argument("--version", action="version", version=f"deeplsp {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    t = sub.add_parser("train", help="train a dense model and save a checkpoint")
    t.add_argument("--model", required=True, choices=MODELS.names())
    t.add_argument("--dataset", required=True, choices=DATASETS.names())
    t.add_argument("--data-dir", type=Path, help="where the dataset lies (default: see README)")
    t.add_argument("--download", action="store_true", help="download the dataset if missing")
    t.add_argument("--out", type=Path, help="checkpoint path (default runs/MODEL-DATASET/dense.pt)")
    t.add_argument("--epochs", type=_non_negative_int, default=10)
    t.add_argument("--batch-size", type=_positive_int, default=128)
    t.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    t.add_argument("--lr", type=_positive_float, default=0.05)
    t.add_argument("--weight-decay", type=_non_negative_float, default=5e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's)")
    t.add_argument("--train-device", choices=("auto", "cpu", "cuda"), default="auto")
    t.add_argument("--workers", type=_non_negative_int, default=0, help="data loader workers")
    t.add_argument("--train-subset", type=_positive_int, help="train on this many images")
    t.add_argument("--test-subset", type=_positive_int, help="evaluate on this many images")
    t.add_argument(
        "--pretrained",
        action="store_true",
        help="start from torchvision's ImageNet weights (needs internet once)",
    )
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="export a checkpoint to a verified ONNX file")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--out", type=Path, help="ONNX path (default: the checkpoint's, .onnx)")
    e.add_argument("--batch", type=_positive_int, default=1)
    e.add_argument("--opset", type=_positive_int, default=18)
    e.add_argument("--simplify", action="store_true", help="simplify the graph with onnxslim")
    e.add_argument(
        "--atol", type=_positive_float, default=1e-3, help="largest |torch - onnxruntime| accepted"
    )
    e.add_argument(
        "--engine",
        action="store_true",
        help="also build a TensorRT engine (F.engine + F.engine.json) on --device",
    )
    e.add_argument(
        "--device",
        choices=[d.name for d in DEVICES if d.backend == "tensorrt"],
        help="--engine: the TensorRT device that will run it (default gpu)",
    )
    _add_device_url(e, "--engine: build")
    e.add_argument(
        "--precision", choices=("fp32", "fp16", "int8"), help="default: the device's (fp16)"
    )
    e.add_argument("--workspace-mb", type=_positive_int, help="builder workspace (default 1024)")
    e.add_argument("--sparse", action="store_true", help="use 2:4 sparse kernels where possible")
    e.add_argument("--dataset", choices=DATASETS.names(), help="int8: calibrate on this dataset")
    e.add_argument("--data-dir", type=Path, help="int8: where the dataset lies")
    e.add_argument(
        "--calibration-batches", type=_positive_int, default=16, help="int8: batches to calibrate"
    )
    e.set_defaults(func=cmd_export)

    pr = sub.add_parser("profile", help="measure an ONNX model's latency on a device")
    pr.add_argument("model", type=Path, help="ONNX file")
    pr.add_argument("--device", default="cpu", choices=DEVICES.names())
    _add_device_url(pr)
    pr.add_argument("--warmup", type=_non_negative_int, default=20)
    pr.add_argument("--iters", type=_positive_int, default=100)
    pr.add_argument("--threads", type=_positive_int, help="override the device's thread count")
    pr.add_argument("--json", type=Path, help="also write the measurement to this file")
    pr.set_defaults(func=cmd_profile)

    pn = sub.add_parser("prune", help="prune a model to a latency budget on a device (DeepLSP)")
    pn.add_argument("--model", required=True, choices=MODELS.names())
    pn.add_argument("--dataset", required=True, choices=DATASETS.names())
    pn.add_argument("--checkpoint", type=Path, help="dense checkpoint (default: train one first)")
    pn.add_argument("--device", default="cpu", choices=DEVICES.names())
    _add_device_url(pn)
    pn.add_argument(
        "--threads",
        type=_positive_int,
        help="ONNX Runtime threads on a cpu device (default: every core); 1 times steadily "
        "on a shared VM",
    )
    target = pn.add_mutually_exclusive_group(required=True)
    target.add_argument("--budget-ms", type=_positive_float, help="latency budget on the device")
    target.add_argument(
        "--budget-ratio",
        type=_positive_float,
        help="latency budget as a fraction of the dense model's latency measured on the "
        "device in this run (0.5: twice as fast)",
    )
    target.add_argument(
        "--keep-ratio",
        type=_positive_float,
        help="fraction of all channels to keep (allocated by sensitivity)",
    )
    pn.add_argument(
        "--latency-weight",
        type=_non_negative_float,
        default=1.0,
        help="--keep-ratio: weight of latency against loss when placing channels (0: loss only)",
    )
    pn.add_argument(
        "--importance",
        choices=("taylor", "l1", "l2"),  # deeplsp.structure.IMPORTANCES (torch-free here)
        default="taylor",
        help="how channels are ranked within a group: first-order Taylor on calibration "
        "batches, or weight magnitude (default: %(default)s)",
    )
    pn.add_argument(
        "--selection",
        choices=("sensitivity", "adaptive-bn", "short-finetune"),  # pruner.SELECTIONS
        default=None,
        help="which knapsack answer to measure: the loss-increase knapsack's unless, among "
        "the knapsack's answers under blends of loss increase and removed importance, the "
        "threshold rule's answer and the knapsack held to 3/4 of its counts, one "
        "has a clearly lower loss after BatchNorm re-estimation (adaptive-bn, the "
        "knapsack's default), or after one short pass of distillation over --short-images "
        "training images and BatchNorm re-estimation (short-finetune); or the "
        "loss-increase knapsack's alone (sensitivity, the threshold rule's)",
    )
    pn.add_argument(
        "--sensitivity",
        choices=("context", "dense"),  # deeplsp.pruner.SENSITIVITIES (torch-free here)
        default="dense",
        help="the knapsack's loss table: each group cut alone in the dense model (dense), "
        "or each group's loss after BatchNorm re-estimation with every other group at the "
        "uniform network nearest the budget (context: sees deep residual cuts that the "
        "other groups make up for alone, but reads nothing where that network is near "
        "chance; bench/README.md, session 18) (default: %(default)s)",
    )
    pn.add_argument(
        "--allocation",
        choices=("knapsack", "threshold"),  # deeplsp.pruner.ALLOCATIONS (torch-free here)
        default="knapsack",
        help="how many channels each group keeps: the knapsack on measured loss increase "
        "and table latency, or one global importance threshold aimed at the budget (ahead "
        "at 30%% of MobileNetV3-L's latency, behind at 50-70%%: bench/README.md, session 7) "
        "(default: %(default)s)",
    )
    pn.add_argument(
        "--amount",
        default="0",
        help="unstructured stage: a fraction of the remaining weights, or 'adaptive'",
    )
    pn.add_argument("--finetune-epochs", type=_non_negative_int, default=1)
    pn.add_argument(
        "--finetune-lr",
        type=_positive_float,
        default=1e-3,
        help="AdamW learning rate of fine-tuning (default 1e-3, for deep cuts; "
        "lower it for light ones, see the report's top-1 before fine-tuning)",
    )
    pn.add_argument(
        "--dense-epochs",
        type=_non_negative_int,
        default=1,
        help="epochs of dense training when no --checkpoint is given",
    )
    pn.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small data subsets, 4 ratios, one short fine-tuning epoch",
    )
    pn.add_argument("--data-dir", type=Path)
    pn.add_argument("--train-subset", type=_positive_int)
    pn.add_argument("--test-subset", type=_positive_int)
    pn.add_argument(
        "--max-iterations",
        type=_positive_int,
        default=6,
        help="measured search iterations before giving up",
    )
    pn.add_argument(
        "--climb",
        type=_non_negative_int,
        default=2,
        help="measurements after the search of larger networks up to the budget less its "
        "guard; the best measured within it is delivered (0: deliver the search's network)",
    )
    pn.add_argument(
        "--guard",
        type=_non_negative_float,
        default=0.06,  # PruneConfig.guard (torch-free here)
        help="noise guard: a network is delivered only if measured at most (1 - guard) x "
        "the budget, so that a re-timing keeps it within (default %(default)s: on a shared "
        "2-core VM one delivered network in 45 at the goal re-timed over the budget, 1 in "
        "15 at 0.04; bench/README.md, guard_retiming); lower it on a quiet device",
    )
    pn.add_argument(
        "--short-images",
        type=_positive_int,
        default=512,
        help="--selection short-finetune: training images in the short fine-tuning of each "
        "knapsack answer (default: %(default)s; --quick: at most 128)",
    )
    pn.add_argument(
        "--timing",
        choices=("paired", "absolute"),  # deeplsp.pruner.TIMINGS (torch-free here)
        default="paired",
        help="paired (default): time each candidate alternately with a reference and count "
        "their ratio, steady on a shared machine (the dense model, or for candidates under "
        "the device's cache knee an in-cache pruned network); absolute: each file on its own",
    )
    pn.add_argument("--seed", type=int, default=0)
    pn.add_argument("--out", type=Path, help="output folder (default runs/MODEL-DATASET-DEVICE)")
    pn.set_defaults(func=cmd_prune)

    cp = sub.add_parser(
        "compare", help="run DeepLSP and the ten baselines on datasets (resumable batch grid)"
    )
    cp.add_argument("model", choices=MODELS.names())
    cp.add_argument("datasets", nargs="+", choices=DATASETS.names(), metavar="DATASET")
    cp.add_argument("--pruners", help="comma-separated pruner names (default: all eleven)")
    cp.add_argument("--device", default="cpu", choices=DEVICES.names())
    _add_device_url(cp)
    cp.add_argument("--out", type=Path, help="output folder (default runs/compare-MODEL)")
    cp.add_argument("--quick", action="store_true", help="tiny subsets, one epoch per method")
    dl = cp.add_mutually_exclusive_group()
    dl.add_argument("--budget-ms", type=_positive_float, help="DeepLSP's latency budget")
    dl.add_argument("--keep-ratio", type=_positive_float, help="DeepLSP's keep ratio (0.5)")
    cp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="override a method's setting, e.g. SNIP.sparsity=0.3 (repeatable)",
    )
    cp.add_argument(
        "--epochs", type=_non_negative_int, default=1, help="training budget per method"
    )
    cp.add_argument("--dense-epochs", type=_non_negative_int, default=1)
    cp.add_argument("--train-subset", type=_positive_int)
    cp.add_argument("--test-subset", type=_positive_int)
    cp.add_argument("--data-dir", type=Path)
    cp.add_argument("--retry-failed", action="store_true", help="rerun cells that failed before")
    cp.add_argument("--seed", type=int, default=0)
    cp.set_defaults(func=cmd_compare)

    d = sub.add_parser("devices", help="list target devices and whether they are ready")
    d.add_argument("--json", action="store_true", help="print full fingerprints as JSON")
    _add_device_url(d)
    d.set_defaults(func=cmd_devices)

    rg = sub.add_parser(
        "regress", help="latency regression test: a suite of models against a baseline"
    )
    rg.add_argument("suite", type=Path, help="suite file (TOML; see deeplsp/regress.py)")
    rg.add_argument("--device", default="cpu", choices=DEVICES.names())
    _add_device_url(rg)
    rg.add_argument("--baseline", type=Path, help="default: baseline-DEVICE.json beside the suite")
    rg.add_argument("--update", action="store_true", help="record the baseline instead")
    rg.add_argument(
        "--tolerance", type=_positive_float, help="allowed slow-down of a ratio (default: suite's)"
    )
    rg.add_argument("--json", type=Path, help="also write the full report here")
    rg.set_defaults(func=cmd_regress)

    ag = sub.add_parser("agent", help="the on-device profiling agent (run it on the Jetson)")
    agsub = ag.add_subparsers(dest="agent_command", required=True, parser_class=_Parser)
    sv = agsub.add_parser(
        "serve",
        help="serve this machine's device over HTTP; token from $DEEPLSP_AGENT_TOKEN or "
        "--token-file, never the command line",
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    sv.add_argument("--port", type=_positive_int, default=8765)
    sv.add_argument("--device", choices=DEVICES.names(), help="device to serve (default: detected)")
    sv.add_argument("--token-file", type=Path, help="file holding the token (chmod 600)")
    sv.add_argument("--threads", type=_positive_int, help="ONNX Runtime threads of the cpu device")
    sv.add_argument("--max-upload-mb", type=_positive_int, default=512)
    sv.add_argument("--max-queue", type=_positive_int, default=8, help="jobs waiting at most")
    sv.add_argument("--job-timeout-s", type=_positive_float, default=900, help="limit of one job")
    sv.set_defaults(func=cmd_agent_serve)
    tk = agsub.add_parser("token", help="make a new random agent token")
    tk.add_argument("--out", type=Path, help="write it to this file (mode 600), else print it")
    tk.add_argument("--force", action="store_true", help="replace an existing token file")
    tk.set_defaults(func=cmd_agent_token)

    sub.add_parser("models", help="list models").set_defaults(func=cmd_models)
    sub.add_parser("datasets", help="list datasets").set_defaults(func=cmd_datasets)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        rc = args.func(args) or 0
    except DeepLSPError as exc:
        print(f"deeplsp: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("deeplsp: interrupted; no partial output was written", file=sys.stderr)
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
