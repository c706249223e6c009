"""The CLI: help works, every bad input is one line + exit 2, and the stages chain."""

import json
import subprocess
import sys

import pytest

from deeplsp.cli import main


def _run(capsys, *argv):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse exits for --help and usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "command", ["train", "export", "profile", "devices", "models", "datasets", "regress", "agent"]
)
def test_help_for_every_command(capsys, command):
    code, out, _ = _run(capsys, command, "--help")
    assert code == 0 and "usage: deeplsp " + command in out


def test_devices_lists_cpu_as_ready(capsys):
    code, out, _ = _run(capsys, "devices")
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("cpu"))
    assert "onnxruntime" in line and "ready" in line


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--model", "alexnet", "--dataset", "cifar10"], "invalid choice: 'alexnet'"),
        (["train", "--model", "resnet18", "--dataset", "mnist"], "choose from 'cifar10'"),
        (
            ["train", "--model", "resnet18", "--dataset", "cifar10", "--epochs", "-1"],
            "must be >= 0",
        ),
        (
            ["train", "--model", "resnet18", "--dataset", "cifar10", "--batch-size", "0"],
            "must be a positive integer",
        ),
        (
            ["train", "--model", "resnet18", "--dataset", "cifar10", "--train-subset", "-5"],
            "must be a positive integer",
        ),
        (["profile", "m.onnx", "--device", "tpu"], "invalid choice: 'tpu'"),
        (["profile", "m.onnx", "--iters", "0"], "must be a positive integer"),
        (["export", "c.pt", "--batch", "-1"], "must be a positive integer"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_are_one_line_exit_2(capsys, argv, needle):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["prune", "--model", "resnet18", "--dataset", "fashionmnist", "--device", "gpu",
         "--budget-ms", "5"],
        ["profile", "m.onnx", "--device", "gpu"],
        ["export", "c.pt", "--engine"],
    ],
)  # fmt: skip
def test_tensorrt_devices_without_tensorrt_say_what_to_install(capsys, monkeypatch, argv):
    import devices.config as cfgmod

    monkeypatch.setattr(cfgmod, "missing_requirements", lambda d: list(d.requires))
    monkeypatch.delenv("DEEPLSP_DEVICE_URL", raising=False)
    code, _, err = _run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "needs tensorrt and pycuda (not installed): pip install 'deeplsp[tensorrt]'" in err
    code, out, _ = _run(capsys, "devices")  # the rest of the CLI is unaffected
    assert code == 0 and "needs tensorrt, pycuda" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["profile", "m.onnx", "--device", "jetson-orin"], "reached through its agent"),
        (["profile", "m.onnx", "--device-url", "orin:8765"], "not an http(s) URL"),
        (["agent", "serve"], "the agent needs a token"),
        (["regress", "none.toml"], "cannot read suite"),
    ],
)
def test_device_and_agent_errors_are_one_line_exit_2(capsys, monkeypatch, argv, needle):
    monkeypatch.delenv("DEEPLSP_DEVICE_URL", raising=False)
    monkeypatch.delenv("DEEPLSP_AGENT_TOKEN", raising=False)
    code, _, err = _run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert needle in err


def test_missing_files_and_data_are_one_line_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    cases = [
        (["export", str(tmp_path / "nope.pt")], "does not exist"),
        (["profile", str(tmp_path / "nope.onnx")], "does not exist"),
        (["profile", str(bad)], "cannot load"),
        (
            [
                "train",
                "--model",
                "resnet18",
                "--dataset",
                "cifar10",
                "--data-dir",
                str(tmp_path / "empty"),
            ],
            str(tmp_path / "empty"),
        ),
    ]
    for argv, needle in cases:
        code, _, err = _run(capsys, *argv)
        assert code == 2, argv
        assert err.startswith("deeplsp: error: ") and needle in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_console_entry_has_no_traceback_on_bad_input(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "deeplsp", "export", str(tmp_path / "missing.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"deeplsp: error: checkpoint {tmp_path / 'missing.pt'} does not exist"
    )


@pytest.mark.slow
def test_train_export_profile_chain(capsys, tmp_path, fashionmnist_dir):
    ckpt = tmp_path / "run" / "dense.pt"
    code, out, err = _run(
        capsys,
        "train",
        "--model",
        "resnet18",
        "--dataset",
        "fashionmnist",
        "--data-dir",
        str(fashionmnist_dir),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--threads",
        "2",
        "--out",
        str(ckpt),
    )
    assert code == 0, err
    assert "test top-1 / top-5" in out and "MACs (conv + linear)" in out and ckpt.is_file()

    onnx_path = tmp_path / "run" / "model.onnx"
    code, out, err = _run(capsys, "export", str(ckpt), "--out", str(onnx_path))
    assert code == 0, err
    assert onnx_path.is_file() and "max |torch - onnxruntime|" in out

    report = tmp_path / "run" / "profile.json"
    code, out, err = _run(
        capsys, "profile", str(onnx_path), "--iters", "5", "--warmup", "1", "--json", str(report)
    )
    assert code == 0, err
    assert "latency median / p90" in out
    data = json.loads(report.read_text())
    assert data["inputs"] == {"input": [1, 1, 32, 32]}
    assert data["latency_ms"]["n"] == 5 and data["latency_ms"]["median"] > 0

    from deeplsp.checkpoint import load_checkpoint

    ckpt_data = load_checkpoint(ckpt, expect_model="resnet18")
    assert ckpt_data.dataset == "fashionmnist"
    # the exported graph's MACs equal the training-side count
    assert data["cost"]["macs"] == ckpt_data.metrics["cost"]["macs"]


def test_prune_choices_match_the_pruner():
    """The CLI spells the pruner's choices out (it imports no torch); they must agree."""
    from deeplsp.cli import build_parser
    from deeplsp.pruner import ALLOCATIONS, SELECTIONS, SENSITIVITIES, TIMINGS, PruneConfig
    from deeplsp.structure import IMPORTANCES

    args = build_parser().parse_args(
        ["prune", "--model", "resnet18", "--dataset", "fashionmnist", "--budget-ms", "1"]
    )
    assert args.threads is PruneConfig.threads  # the device's own unless asked
    assert (args.climb, args.guard) == (PruneConfig.climb, PruneConfig.guard)
    assert (args.importance, args.selection, args.allocation, args.timing) == (
        PruneConfig.importance,
        PruneConfig.selection,
        PruneConfig.allocation,
        PruneConfig.timing,
    )
    assert args.sensitivity == PruneConfig.sensitivity
    prune = next(
        a
        for a in build_parser()._subparsers._group_actions[0].choices.values()
        if a.prog.endswith(" prune")
    )
    choices = {a.dest: tuple(a.choices) for a in prune._actions if a.choices}
    assert set(choices["importance"]) == set(IMPORTANCES)
    assert set(choices["selection"]) == set(SELECTIONS)
    assert set(choices["allocation"]) == set(ALLOCATIONS)
    assert set(choices["sensitivity"]) == set(SENSITIVITIES)
    assert set(choices["timing"]) == set(TIMINGS)


def test_prune_passes_threads_finetune_lr_climb_and_guard_to_the_pruner(capsys, monkeypatch):
    import deeplsp.pruner as pruner
    from deeplsp.errors import DeepLSPError

    seen = []

    def fake_prune(cfg):
        seen.append(cfg)
        raise DeepLSPError("stop here")

    monkeypatch.setattr(pruner, "prune", fake_prune)
    argv = ["prune", "--model", "resnet18", "--dataset", "fashionmnist", "--budget-ms", "1"]
    code, _, err = _run(capsys, *argv, "--threads", "1")
    assert code == 2 and "stop here" in err and seen[0].threads == 1
    code, _, err = _run(capsys, *argv, "--threads", "0")
    assert code == 2 and "--threads" in err and len(seen) == 1
    assert seen[0].finetune_lr == 1e-3  # the default
    code, _, err = _run(capsys, *argv, "--finetune-lr", "1e-4")
    assert code == 2 and seen[-1].finetune_lr == 1e-4
    code, _, err = _run(capsys, *argv, "--finetune-lr", "0")
    assert code == 2 and "--finetune-lr" in err and len(seen) == 2
    code, _, err = _run(capsys, *argv, "--climb", "0")
    assert code == 2 and seen[-1].climb == 0
    code, _, err = _run(capsys, *argv, "--climb", "-1")
    assert code == 2 and "--climb" in err and len(seen) == 3
    assert seen[-1].short_images == 512  # the default
    code, _, err = _run(capsys, *argv, "--selection", "short-finetune", "--short-images", "64")
    assert code == 2 and seen[-1].short_images == 64 and seen[-1].selection == "short-finetune"
    code, _, err = _run(capsys, *argv, "--short-images", "0")
    assert code == 2 and "--short-images" in err and len(seen) == 4
    code, _, err = _run(capsys, *argv, "--guard", "0.02")
    assert code == 2 and seen[-1].guard == 0.02
    code, _, err = _run(capsys, *argv, "--guard", "-0.1")
    assert code == 2 and "--guard" in err and len(seen) == 5
    # past the pruner's range: PruneConfig's own one-line error, exit 2
    code, _, err = _run(capsys, *argv, "--guard", "0.6")
    assert code == 2 and "--guard must be in [0, 0.5) (got 0.6)" in err and len(seen) == 5
