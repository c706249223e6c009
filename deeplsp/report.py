"""The one report writer: report.json (everything), report.md (for people) and plots."""

from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from deeplsp.atomic import atomic_path, write_json, write_text


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _ms(stats: dict) -> str:
    return f"{stats['median']:.3f} / {stats['p90']:.3f}"


def _plots(out: Path, report: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    groups = report["groups"]
    ax1.bar(range(len(groups)), [g["ratio"] for g in groups], color="tab:blue")
    ax1.set_xticks(range(len(groups)), [g["id"] for g in groups], rotation=75, fontsize=7)
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("keep ratio")
    ax1.set_title("channels kept per group")
    stair = report["staircase"]
    xs = [p[0] for p in stair["points"]]
    ys = [p[1] * 1e3 for p in stair["points"]]
    ax2.step(xs, ys, where="post", color="tab:red")
    ax2.plot(xs, ys, ".", color="tab:red")
    ax2.set_xlabel("output channels")
    ax2.set_ylabel("latency (µs)")
    ax2.set_title(f"measured latency of {stair['layer']}\n{stair['signature']}", fontsize=9)
    fig.tight_layout()
    with atomic_path(out / "report.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    files["plot"] = "report.png"
    return files


def markdown(report: dict) -> str:
    cfg, dense, pruned = report["config"], report["dense"], report["pruned"]
    title = f"# DeepLSP: {cfg['model']} on {cfg['dataset']}, device `{cfg['device']}`"
    lines = [title, ""]
    if report["quick"]:
        lines += [
            "**Quick run** (`--quick`): small data subsets and one short fine-tuning "
            "epoch; accuracies are not representative.",
            "",
        ]
    if cfg.get("budget_ratio") is not None:
        target = (
            f"budget {cfg['budget_ratio']:g} x the dense model's measured latency "
            f"= {report['budget_ms']:.3f} ms"
        )
    elif cfg["budget_ms"] is not None:
        target = f"budget {cfg['budget_ms']} ms"
    else:
        target = f"keep ratio {cfg['keep_ratio']}"
    lines += [
        f"Target: {target}. Result: {report['status']}.",
        "",
        f"Dense model: {dense['note']}.",
        "",
    ]
    rows = [
        ("test top-1", f"{dense['test']['top1']:.2%}", f"{pruned['test']['top1']:.2%}"),
    ]
    if pruned.get("test_before_finetune"):
        before = pruned["test_before_finetune"]["top1"]
        rows.append(("test top-1 before fine-tuning", "", f"{before:.2%}"))
    rows += [
        ("latency median / p90 (ms)", _ms(dense["latency_ms"]), _ms(pruned["latency_ms"])),
        ("predicted latency (ms)", "", f"{pruned['predicted_ms']:.3f}"),
        ("MACs", f"{dense['cost']['macs']:,}", f"{pruned['cost']['macs']:,}"),
        ("parameters", f"{dense['cost']['params']:,}", f"{pruned['cost']['params']:,}"),
        ("non-zero parameters", "", f"{pruned['nonzero_params']:,}"),
        ("ONNX size (MB)", f"{dense['onnx_bytes'] / 1e6:.2f}", f"{pruned['onnx_bytes'] / 1e6:.2f}"),
    ]
    lines += [tabulate(rows, headers=("", "dense", "pruned"), tablefmt="github"), ""]
    lines += [_finetune_line(cfg), ""]
    if pruned.get("timings_ms"):
        timed = ", ".join(f"{t:.3f}" for t in pruned["timings_ms"])
        lines += [f"The pruned model's latency is the median of its timings ({timed} ms).", ""]
    lines += ["## Per-group keep ratios", ""]
    lines += [
        tabulate(
            [
                (g["id"], g["channels"], g["keep"], f"{g['ratio']:.2f}", _num(g["sensitivity"]))
                for g in report["groups"]
            ],
            headers=("group", "channels", "kept", "ratio", "loss increase"),
            tablefmt="github",
        ),
        "",
    ]
    sens = report.get("sensitivity") or {}
    if sens.get("mode") == "context":
        lines += [
            f"Loss increase in context: each group's adaptive-BN loss (nats, on "
            f"{sens['images'] // 2} held-out training images after BatchNorm re-estimation "
            f"on as many) with every other group at {sens['ratio']:.0%} of its channels, "
            f"the uniform network nearest the target (predicted {sens['predicted_ms']:.3f} "
            f"ms), over the group at full width there.",
            "",
        ]
    elif report["groups"] and report.get("sensitivity"):
        lines += [
            "Loss increase: each group cut alone in the dense model, on the calibration batches.",
            "",
        ]
    threshold = cfg.get("allocation") == "threshold"
    delivered = {g["id"]: g["keep"] for g in report["groups"]}
    lines += ["## Search (each candidate exported and measured on the device)", ""]
    lines += [
        tabulate(
            [
                (
                    c["note"],
                    f"{c['predicted_ms']:.3f}",
                    f"{c['measured']['latency']['median']:.3f}" if c["measured"] else "-",
                    f"{c['cost']:.4f}",
                    "-" if c.get("score") is None else f"{c['score']:.4f}",
                    "yes" if c["keeps"] == delivered else "",
                )
                for c in report["search"]
            ],
            headers=(
                "candidate",
                "predicted ms",
                "measured ms",
                "importance removed" if threshold else "loss increase",
                "loss after short fine-tune"
                if cfg.get("selection") == "short-finetune"
                else "adaptive-BN loss",
                "delivered",
            ),
            tablefmt="github",
        ),
        "",
    ]
    if any("(climb" in c["note"] for c in report["search"]):
        lines += [
            "Candidates marked climb were measured after the search: larger allocations "
            "aimed at the budget less its guard (`--climb`).",
            "",
        ]
    cal = report["calibration"]
    lt = report["latency_table"]
    fp = report["fingerprint"]
    url = report["device"].get("url")
    via = f", measured through the agent at {url}" if url else ""
    lines += [
        "## Latency model",
        "",
        f"Per-layer table: {lt['rows']} rows for this device ({lt['new_rows']} measured in "
        f"this run; {lt['hits']} hits), {lt['path']}. Each layer is timed with the "
        "activation it feeds, "
        + (
            "by ONNX Runtime's kernel time without the layout conversions a layer alone has"
            if lt.get("timing") == "kernels"
            else "as a whole one-layer file"
        )
        + f". {_weight_cost_line(cal)} {_fits_line(cal, pruned)} "
        f"Calibration: a monotone curve from that sum to latency, fitted on {cal['points']} "
        "measured models (dense, middle, smallest, the two with weights at opposite ends, and "
        "networks with random per-group counts): "
        + (
            "a quadratic in log-log through the dense and the smallest, bent to fit the rest"
            if cal.get("smooth")
            else "straight between neighbours in log-log"
        )
        + f" (least-squares line for comparison: {cal['scale']:.3f} x sum "
        f"{cal['offset']:+.3f} ms).",
        "",
        f"Device fingerprint {fp['id']}: {device_summary(fp)}, runtime {fp.get('runtime', {})}"
        f"{via}.",
        "",
    ]
    timing = report.get("timing") or {}
    if timing.get("mode") == "paired":
        as_timed = pruned.get("latency_as_timed_ms")
        lines += [
            f"Timing: after the dense model's measurement ({timing['dense_ms']:.3f} ms, the "
            "median of three), "
            f"every file was timed alternately with it in {timing['rounds']} rounds; its "
            "latency is the median ratio to the dense model times that figure, so a slow "
            "spell of the device moves both and not the search"
            + (
                f" (the delivered model as timed: {_ms(as_timed)} ms, "
                f"{pruned['ratio_to_dense']:.3f} x the dense model)."
                if as_timed
                else "."
            ),
            "",
        ]
        in_cache = timing.get("in_cache")
        if in_cache:
            lines += [
                f"Files with at most {_count(in_cache['free_weights'])} layer weights (the "
                "device's cache knee) were timed against a uniform pruned network with "
                f"{_count(in_cache['weights'])} instead ({in_cache['ms']:.3f} ms at the dense "
                "model's speed, the median of three): another process's memory traffic "
                "evicts the weights of a network past the knee and not those of one under "
                "it, so each file is compared with a reference that it shares that with.",
                "",
            ]
    drift = timing.get("drift")
    if drift:
        lines += [
            f"Drift check: the middle calibration network measured "
            f"{drift['at_calibration_ms']:.3f} ms at calibration and "
            f"{drift['at_delivery_ms']:.3f} ms before delivery ({drift['change']:+.1%}): "
            + (
                f"within the {drift['threshold']:.0%} this run treats as steady."
                if drift["steady"]
                else f"more than {drift['threshold']:.0%}. The device's speed changed during "
                "the run, so latencies measured at different times in it (the search's, the "
                "delivered model's) are uncertain by about that much."
            ),
            "",
        ]
    if report.get("engine"):
        e = report["engine"]
        lines += [
            f"TensorRT engine `model.engine` ({e['precision']}, TensorRT {e['tensorrt_version']}, "
            f"{e['gpu']}), built on the device in {e['build_seconds']:.1f} s; its metadata is "
            "in `model.engine.json`.",
            "",
        ]
    lines += [
        "## Time per stage",
        "",
        tabulate(
            [(k, f"{v:.1f} s") for k, v in report["seconds"].items()],
            tablefmt="github",
            headers=("stage", "time"),
        ),
        "",
        "![keep ratios and latency staircase](report.png)",
        "",
    ]
    return "\n".join(lines)


def device_summary(fp: dict) -> str:
    """A fingerprint in a few words: the board or GPU and its power mode, else the CPU."""
    if fp.get("gpu") or fp.get("model"):
        gpu = (fp.get("gpu") or {}).get("name", "GPU")
        mode = (fp.get("power_mode") or {}).get("name")
        return ", ".join(str(x) for x in (fp.get("model"), gpu, mode and f"power mode {mode}") if x)
    return f"{fp.get('cpu', '')}, {fp.get('cores', '')} threads"


def write_report(out: Path, report: dict) -> None:
    out = Path(out)
    report["files"] = {
        "model": "pruned.pt",
        "onnx": "model.onnx",
        **({"engine": "model.engine"} if report.get("engine") else {}),
        **_plots(out, report),
        "markdown": "report.md",
    }
    write_text(out / "report.md", markdown(report))
    write_json(out / "report.json", report)


# -- the batch comparison ------------------------------------------------------------
COLUMNS = (
    ("method", "method"),
    ("kind", "type"),
    ("target", "target"),
    ("achieved", "achieved"),
    ("top1_dense", "top-1 dense"),
    ("top1", "top-1"),
    ("sparsity", "sparsity"),
    ("nonzero_params", "non-zero params"),
    ("macs", "MACs"),
    ("onnx_bytes", "ONNX bytes"),
    ("onnx_gzip_bytes", "gzip bytes"),
    ("latency_ms", "latency ms"),
    ("latency_p90_ms", "p90 ms"),
    ("speedup", "speed-up"),
    ("seconds", "time s"),
)


def cell_text(row: dict, key: str) -> str:
    value = row.get(key)
    if key == "target":
        note = "" if row["exact"] else " (inexact)"
        return f"{row['target_metric']} {row['target']:.3g}{note}"
    if key in ("top1", "top1_dense", "sparsity", "achieved") and value is not None:
        return f"{value:.3f}"
    if key in ("latency_ms", "latency_p90_ms", "speedup") and value is not None:
        return f"{value:.3f}"
    if key == "seconds":
        return f"{value:.0f}"
    return "" if value is None else str(value)


def comparison_markdown(summary: dict) -> str:
    cfg = summary["config"]
    fp = summary["fingerprint"]
    lines = [f"# Pruning comparison: {cfg['model']} on device `{cfg['device']}`", ""]
    if summary["quick"]:
        lines += [
            "**Quick run** (`--quick`): tiny data subsets and one training epoch per method; "
            "accuracies are not representative.",
            "",
        ]
    lines += [
        f"Training budget per method: {cfg['epochs']} epoch(s) on "
        f"{cfg['train_subset'] or 'all'} training images; top-1 on "
        f"{cfg['test_subset'] or 'all'} test images. Latency: ONNX Runtime median / p90 at "
        f"batch 1 on {fp.get('cpu', cfg['device'])}. Sparsity: fraction of conv and linear "
        "weights that are zero. Speed-up: dense latency / pruned latency, measured the same "
        "way.",
        "",
    ]
    for dataset in cfg["datasets"]:
        rows = [c for c in summary["cells"] if c.get("dataset") == dataset]
        lines.append(f"## {dataset}")
        lines.append("")
        skipped = [c for c in rows if c.get("skipped")]
        if skipped:
            lines += [f"Skipped: {skipped[0]['skipped']}", ""]
            continue
        ok = [c for c in rows if not c.get("error")]
        table = [[cell_text(r, k) for k, _ in COLUMNS] for r in ok]
        lines.append(tabulate(table, headers=[h for _, h in COLUMNS], tablefmt="github"))
        for r in rows:
            if r.get("error"):
                lines.append(f"\n- **{r['method']} failed**: {r['error']}")
        lines += ["", f"![accuracy against latency and size](plot-{dataset}.png)", ""]
    return "\n".join(lines)


def _comparison_plot(out: Path, dataset: str, rows: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        for ax, key in ((ax1, "latency_ms"), (ax2, "onnx_gzip_bytes")):
            x = r[key] / 1e6 if key == "onnx_gzip_bytes" else r[key]
            ax.scatter(x, r["top1"], s=30)
            ax.annotate(r["method"], (x, r["top1"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    if rows:
        for ax in (ax1, ax2):
            ax.axhline(rows[0]["top1_dense"], color="grey", ls="--", lw=0.8, label="dense")
            ax.legend(fontsize=7)
    ax1.set_xlabel("measured latency (ms, median)")
    ax2.set_xlabel("model size (MB, ONNX gzip)")
    for ax in (ax1, ax2):
        ax.set_ylabel("top-1")
    ax1.set_title(f"{dataset}: accuracy against measured latency")
    ax2.set_title(f"{dataset}: accuracy against model size")
    fig.tight_layout()
    name = f"plot-{dataset}.png"
    with atomic_path(out / name) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return name


def write_comparison(out: Path, summary: dict) -> None:
    """results.json (everything), results.csv (one row per cell), results.md and plots."""
    import csv
    import io

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for dataset in summary["config"]["datasets"]:
        rows = [
            c
            for c in summary["cells"]
            if c.get("dataset") == dataset and not c.get("error") and not c.get("skipped")
        ]
        if rows:
            _comparison_plot(out, dataset, rows)
    flat = [{k: v for k, v in c.items() if not isinstance(v, dict)} for c in summary["cells"]]
    keys = list(dict.fromkeys(k for row in flat for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(flat)
    write_text(out / "results.csv", buf.getvalue())
    write_json(out / "results.json", summary)
    write_text(out / "results.md", comparison_markdown(summary))


def _finetune_line(cfg: dict) -> str:
    """What the pruned accuracy is after: a run with no fine-tuning reports the cut weights'
    accuracy (9% on a 30% MobileNetV3-L cut), which reads as a failure unless said."""
    epochs = cfg["finetune_epochs"]
    if not epochs:
        return (
            "The pruned model is not fine-tuned (`--finetune-epochs 0`): its accuracy is "
            "that of the weights as cut."
        )
    images = cfg.get("train_subset") or "all"
    kd = (
        f"cross-entropy plus {cfg['kd_alpha']:g} x the distillation loss from the dense model "
        f"at temperature {cfg['kd_temperature']:g}"
        if cfg["kd_alpha"]
        else "cross-entropy alone"
    )
    return f"The pruned model is fine-tuned {epochs} epoch(s) on {images} training images: {kd}."


def _weight_cost_line(cal: dict) -> str:
    """How the report's run charged weights: past the device's cache knee, or all of them."""
    cost = f"{1e6 * cal.get('weight_cost', 0.0):.3f} table ms per million weights"
    fitted = "(fitted on two measured networks with their weights at opposite ends)"
    knee = cal.get("free_weights") or {}
    if cal.get("layer_cache_weights"):
        why = (
            "the device has no cache knee: the network's weights all fit its last cache"
            if knee.get("free_weights") is None
            else f"the device's cache knee, {_count(knee['free_weights'])} weights, lies past "
            "the dense network's: no network of the model spills its last cache"
        )
        return (
            f"Each weight of a layer on a 1x1 map whose weights fit the core's cache (at most "
            f"{_count(cal['layer_cache_weights'])}) also costs {cost} {fitted}: timed alone "
            "such a layer reads them from that cache, inside the network the other layers "
            f"have evicted them, and it uses each once per inference ({why})."
        )
    if knee.get("free_weights") is None:
        return (
            f"Each weight also costs {cost}, read from memory inside the network but from "
            f"cache when its layer is timed alone {fitted}."
        )
    chain = knee["chain"]
    return (
        f"The network's weights past the first {_count(knee['free_weights'])} also cost "
        f"{cost} {fitted}: inside a network every layer's weights are read once per "
        "inference, and past that many they no longer fit the device's cache (the knee of "
        f"a chain of equal convolutions timed at {chain[0][0]}-{chain[-1][0]} layers, "
        f"{knee['per_million_weights_ms']:.3f} ms per million weights past it)."
    )


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"


def _fits_line(cal: dict, pruned: dict) -> str:
    """Whether the delivered network's weights fit under the device's cache knee: one that
    does keeps its latency when other processes use the cache, one past it may not (a
    neighbour streaming 48 MB slowed a MobileNetV3-L with 4.2M weights 63%, one with
    1.6M 5%: bench/README.md, cache_pressure)."""
    free = (cal.get("free_weights") or {}).get("free_weights")
    weights = pruned.get("layer_weights")
    if free is None or weights is None:
        return ""
    if weights <= free:
        return (
            f"The delivered network's {_count(weights)} layer weights fit under that knee, so "
            "its latency should not depend on other processes' use of the cache."
        )
    return (
        f"The delivered network's {_count(weights)} layer weights are past that knee, so "
        "other processes' use of the cache can slow it beyond the measured figures."
    )
