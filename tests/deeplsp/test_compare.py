"""The batch comparison on a tiny registered model and a tiny Fashion-MNIST: every cell
measured the same way, failures recorded, interrupted grids resumed."""

import json
from dataclasses import dataclass

import pytest

from deeplsp.cli import main as cli_main
from deeplsp.compare import CompareConfig, run_compare
from deeplsp.errors import DeepLSPError
from deeplsp.masks import apply_masks, magnitude_scores, masks_from_scores
from deeplsp.methods import METHODS, Method, Outcome
from deeplsp.models import MODELS, ModelEntry
from tests.tiny_models import TinyResNet

CALLS: dict[str, int] = {}


@dataclass
class ToyConfig:
    sparsity: float = 0.5


class Toy(Method):
    name = "Toy"
    description = "global magnitude cut, no training (test method)"
    kind = "unstructured"
    Config = ToyConfig

    def run(self, job, cfg):
        CALLS[self.name] = CALLS.get(self.name, 0) + 1
        model = job.copy_dense()
        apply_masks(model, masks_from_scores(magnitude_scores(model), cfg.sparsity))
        return Outcome(model, structured=False, target_metric="sparsity", target=cfg.sparsity)


class Broken(Toy):
    name = "Broken"

    def run(self, job, cfg):
        CALLS[self.name] = CALLS.get(self.name, 0) + 1
        raise RuntimeError("this method always fails")


class Interrupt(Toy):
    name = "Interrupt"
    armed = True

    def run(self, job, cfg):
        if Interrupt.armed:
            CALLS[self.name] = CALLS.get(self.name, 0) + 1
            raise KeyboardInterrupt
        return super().run(job, cfg)


@pytest.fixture
def grid(monkeypatch, tmp_path, fashionmnist_dir):
    CALLS.clear()
    monkeypatch.setitem(
        MODELS._entries, "tinyresnet", ModelEntry("tinyresnet", "test", TinyResNet, "none")
    )
    import deeplsp.compare as compare_mod

    real_load = compare_mod.load_methods

    def load():
        real_load()
        for cls in (Toy, Broken, Interrupt):
            monkeypatch.setitem(METHODS._entries, cls.name, cls())

    monkeypatch.setattr(compare_mod, "load_methods", load)

    def cfg(**kw):
        base = dict(
            model="tinyresnet",
            datasets=["fashionmnist"],
            out=str(tmp_path / "cmp"),
            pruners=["Toy", "Broken"],
            quick=True,
            data_dir=str(fashionmnist_dir),
            iters=5,
            warmup=1,
        )
        base.update(kw)
        return CompareConfig(**base)

    return cfg


def test_cells_are_measured_the_same_way_and_a_failure_does_not_stop_the_grid(grid, tmp_path):
    summary = run_compare(grid(), log=lambda m: None)
    toy, broken = summary["cells"]
    assert broken["error"] == "RuntimeError: this method always fails"
    assert (tmp_path / "cmp" / "tinyresnet-fashionmnist" / "Broken" / "traceback.txt").exists()
    assert toy["error"] is None
    assert toy["achieved"] == pytest.approx(0.5, abs=1e-3) and abs(toy["gap"]) < 1e-3
    assert toy["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert toy["nonzero_params"] < toy["params"]
    assert toy["latency_ms"] > 0 and toy["latency_p90_ms"] >= toy["latency_ms"]
    assert 0 < toy["onnx_gzip_bytes"] < toy["onnx_bytes"]
    assert toy["onnx_max_abs_diff"] < 1e-3
    assert 0 <= toy["top1"] <= 1 and toy["channel_reduction"] == 0
    assert set(toy["per_layer_sparsity"]) == {"stem.0", "conv1", "conv2", "down.0", "fc"}
    out = tmp_path / "cmp"
    for name in ("results.csv", "results.json", "results.md", "plot-fashionmnist.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "Quick run" in md and "| Toy" in md and "**Broken failed**" in md
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and "latency_ms" in csv_lines[0]


def test_rerun_skips_finished_cells_and_retries_failed_ones_only_when_asked(grid):
    run_compare(grid(), log=lambda m: None)
    assert CALLS == {"Toy": 1, "Broken": 1}
    run_compare(grid(), log=lambda m: None)
    assert CALLS == {"Toy": 1, "Broken": 1}
    run_compare(grid(retry_failed=True), log=lambda m: None)
    assert CALLS == {"Toy": 1, "Broken": 2}


def test_an_interrupted_grid_resumes_where_it_stopped(grid, tmp_path):
    Interrupt.armed = True
    with pytest.raises(KeyboardInterrupt):
        run_compare(grid(pruners=["Toy", "Interrupt"]), log=lambda m: None)
    cell = tmp_path / "cmp" / "tinyresnet-fashionmnist"
    assert (cell / "Toy" / "result.json").exists()
    assert not (cell / "Interrupt" / "result.json").exists()
    Interrupt.armed = False
    summary = run_compare(grid(pruners=["Toy", "Interrupt"]), log=lambda m: None)
    assert CALLS == {"Toy": 1, "Interrupt": 2}
    assert [c["method"] for c in summary["cells"]] == ["Toy", "Interrupt"]
    assert json.loads((cell / "Interrupt" / "result.json").read_text())["error"] is None


def test_a_missing_dataset_is_skipped_with_a_message(grid):
    logs = []
    summary = run_compare(grid(datasets=["cifar10", "fashionmnist"]), log=logs.append)
    assert summary["cells"][0]["dataset"] == "cifar10" and summary["cells"][0]["skipped"]
    assert any(m.startswith("cifar10: skipped") for m in logs)
    assert [c.get("method") for c in summary["cells"][1:]] == ["Toy", "Broken"]


def test_bad_settings_fail_before_any_work(grid):
    with pytest.raises(DeepLSPError, match="unknown setting"):
        grid(overrides={"Toy": ["nope=1"]})
    with pytest.raises(DeepLSPError, match="expected float"):
        grid(overrides={"Toy": ["sparsity=half"]})
    with pytest.raises(DeepLSPError, match="unknown pruner"):
        grid(pruners=["Nope"])


def test_cli_errors_are_one_line(grid, capsys):
    assert cli_main(["compare", "resnet18", "fashionmnist", "--set", "nodot"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deeplsp: error:") and "\n" not in err
    assert cli_main(["compare", "resnet18", "fashionmnist", "--pruners", "Nope"]) == 2
    assert "unknown pruner 'Nope'" in capsys.readouterr().err


def test_all_eleven_methods_are_registered_and_run_in_the_seed_order():
    from deeplsp.compare import ORDER

    cfg = CompareConfig(model="resnet18", datasets=["fashionmnist"])
    assert cfg.pruners == list(ORDER) and len(set(ORDER)) == 11
    for name in ORDER:
        method = METHODS.get(name)
        assert method.kind in ("structured", "unstructured", "hybrid")
        method.config()  # the defaults are valid


def test_deeplsp_runs_in_the_grid_through_the_same_interface(grid, monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPLSP_CACHE_DIR", str(tmp_path / "cache"))
    summary = run_compare(
        grid(pruners=["DeepLSP"], overrides={"DeepLSP": ["keep_ratio=0.5", "amount=0.1"]}),
        log=lambda m: None,
    )
    (row,) = summary["cells"]
    assert row["error"] is None, row["error"]
    assert row["structured"] and row["target_metric"] == "channel_reduction"
    assert row["target"] == 0.5 and 0.35 <= row["achieved"] <= 0.65
    assert row["params"] < sum(p.numel() for p in TinyResNet().parameters())
    assert row["sparsity"] == pytest.approx(0.1, abs=0.02)  # the unstructured stage's amount
    assert row["onnx_max_abs_diff"] < 1e-3
    cell = tmp_path / "cmp" / "tinyresnet-fashionmnist" / "DeepLSP"
    assert (cell / "deeplsp" / "report.md").exists() and (cell / "pruned.pt").exists()


def test_main_py_is_the_compare_command():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "main.py", "resnet18", "nodataset"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nodataset" in lines[0] and "fashionmnist" in lines[0]
