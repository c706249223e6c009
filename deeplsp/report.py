"""The one report writer: report.json (everything), report.md (for people) and plots."""

from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from deeplsp.atomic import atomic_path, write_json, write_text


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
    target = (
        f"budget {cfg['budget_ms']} ms"
        if cfg["budget_ms"] is not None
        else f"keep ratio {cfg['keep_ratio']}"
    )
    lines += [
        f"Target: {target}. Result: {report['status']}.",
        "",
        f"Dense model: {dense['note']}.",
        "",
    ]
    rows = [
        ("test top-1", f"{dense['test']['top1']:.2%}", f"{pruned['test']['top1']:.2%}"),
        ("latency median / p90 (ms)", _ms(dense["latency_ms"]), _ms(pruned["latency_ms"])),
        ("predicted latency (ms)", "", f"{pruned['predicted_ms']:.3f}"),
        ("MACs", f"{dense['cost']['macs']:,}", f"{pruned['cost']['macs']:,}"),
        ("parameters", f"{dense['cost']['params']:,}", f"{pruned['cost']['params']:,}"),
        ("non-zero parameters", "", f"{pruned['nonzero_params']:,}"),
        ("ONNX size (MB)", f"{dense['onnx_bytes'] / 1e6:.2f}", f"{pruned['onnx_bytes'] / 1e6:.2f}"),
    ]
    lines += [tabulate(rows, headers=("", "dense", "pruned"), tablefmt="github"), ""]
    lines += ["## Per-group keep ratios", ""]
    lines += [
        tabulate(
            [
                (g["id"], g["channels"], g["keep"], f"{g['ratio']:.2f}", f"{g['sensitivity']:.4f}")
                for g in report["groups"]
            ],
            headers=("group", "channels", "kept", "ratio", "loss increase"),
            tablefmt="github",
        ),
        "",
    ]
    lines += ["## Search (each candidate exported and measured on the device)", ""]
    lines += [
        tabulate(
            [
                (
                    c["note"],
                    f"{c['predicted_ms']:.3f}",
                    f"{c['measured']['latency']['median']:.3f}" if c["measured"] else "-",
                    f"{c['cost']:.4f}",
                )
                for c in report["search"]
            ],
            headers=("candidate", "predicted ms", "measured ms", "sensitivity"),
            tablefmt="github",
        ),
        "",
    ]
    cal = report["calibration"]
    lt = report["latency_table"]
    fp = report["fingerprint"]
    lines += [
        "## Latency model",
        "",
        f"Per-layer table: {lt['rows']} rows for this device ({lt['new_rows']} measured in "
        f"this run; {lt['hits']} hits), {lt['path']}. Calibration: measured = "
        f"{cal['scale']:.3f} x table {cal['offset']:+.3f} ms, fitted on {cal['points']} "
        "measured models.",
        "",
        f"Device fingerprint {fp['id']}: {fp.get('cpu', '')}, {fp.get('cores', '')} threads, "
        f"runtime {fp.get('runtime', {})}.",
        "",
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


def write_report(out: Path, report: dict) -> None:
    out = Path(out)
    report["files"] = {
        "model": "pruned.pt",
        "onnx": "model.onnx",
        **_plots(out, report),
        "markdown": "report.md",
    }
    write_text(out / "report.md", markdown(report))
    write_json(out / "report.json", report)
