"""The regression logic on a deterministic fake device: no wall-clock timing here."""

import json
from pathlib import Path

import pytest

from deeplsp import regress
from deeplsp.cli import main
from deeplsp.errors import DeepLSPError
from devices import get_device
from profiling.runner import LatencyStats

FP = {"id": "fake-hw", "cpu": "fake"}


def _suite(tmp_path: Path, names=("ref", "a", "b"), **settings) -> Path:
    lines = ['reference = "ref"'] + [f"{k} = {v}" for k, v in settings.items()]
    for n in names:
        (tmp_path / f"{n}.onnx").write_bytes(b"onnx")  # the fake device never reads it
        lines += ["[[model]]", f'name = "{n}"', f'onnx = "{n}.onnx"']
    path = tmp_path / "suite.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class FakeDevice:
    """Per-model cost in ms; every round (one pass over the models) runs under its own
    load factor, as on a busy machine."""

    def __init__(self, cost: dict[str, float], loads=(1.0, 3.0, 1.5, 0.8, 2.2, 1.1, 4.0)):
        self.cost, self.loads, self.calls = dict(cost), loads, []

    def __call__(self, device, paths, warmup, iters):
        names = [Path(p).stem for p in paths]
        self.calls.append(names)
        n_models = len(set(names))
        for i, n in enumerate(names):
            load = self.loads[(i // n_models) % len(self.loads)]
            yield LatencyStats.from_samples([self.cost[n] * load] * iters, warmup)


def _run(tmp_path, fake, update=False, fingerprint=FP, **kw):
    return regress.run_regress(
        _suite(tmp_path, **kw.pop("suite", {})),
        get_device("cpu"),
        tmp_path / "baseline.json",
        update=update,
        measure_many=fake,
        fingerprint=fingerprint,
        log=lambda m: None,
        **kw,
    )


def test_ratios_cancel_machine_load_and_a_regression_is_caught(tmp_path):
    cost = {"ref": 10.0, "a": 5.0, "b": 2.0}
    rec = _run(tmp_path, FakeDevice(cost), update=True)
    assert rec.updated and json.loads((tmp_path / "baseline.json").read_text())["models"]["a"][
        "ratio"
    ] == pytest.approx(0.5)
    # same models under a different load pattern: every ratio unchanged -> ok
    same = _run(tmp_path, FakeDevice(cost, loads=(2.0, 0.7, 5.0)))
    assert [v.status for v in same.verdicts] == ["ok"] * 3 and not same.regressed
    # b 30% slower (beyond the 15% tolerance), a 30% faster
    changed = _run(tmp_path, FakeDevice({"ref": 10.0, "a": 3.5, "b": 2.6}))
    status = {v.name: v.status for v in changed.verdicts}
    assert status == {"ref": "ok", "a": "faster", "b": "REGRESSED"}
    assert [v.name for v in changed.regressed] == ["b"]
    assert changed.verdicts[2].change == pytest.approx(0.3)
    assert "REGRESSED" in changed.table()


def test_within_tolerance_is_not_a_regression(tmp_path):
    _run(tmp_path, FakeDevice({"ref": 10.0, "a": 5.0, "b": 2.0}), update=True)
    r = _run(tmp_path, FakeDevice({"ref": 10.0, "a": 5.5, "b": 2.0}))  # +10% < 15%
    assert not r.regressed and r.tolerance == 0.15 and r.same_hardware


def test_other_hardware_gets_the_foreign_tolerance(tmp_path):
    _run(tmp_path, FakeDevice({"ref": 10.0, "a": 5.0, "b": 2.0}), update=True)
    slower = FakeDevice({"ref": 10.0, "a": 6.25, "b": 2.0})  # +25%
    other = _run(tmp_path, slower, fingerprint={"id": "other-hw"})
    assert other.tolerance == 0.30 and not other.same_hardware and not other.regressed
    assert _run(tmp_path, slower).regressed  # the same +25% on the baseline's hardware


def test_rounds_are_interleaved_in_a_rotated_order(tmp_path):
    fake = FakeDevice({"ref": 1.0, "a": 1.0, "b": 1.0})
    _run(tmp_path, fake, update=True, suite={"rounds": 4})
    assert len(fake.calls) == 3  # --update: the middle of three runs
    order = fake.calls[0]  # one measuring call per run
    rounds = [order[i : i + 3] for i in range(0, 12, 3)]
    assert [r[0] for r in rounds] == ["ref", "a", "b", "ref"]
    assert all(sorted(r) == ["a", "b", "ref"] for r in rounds)


def test_new_and_missing_models_are_reported_not_failed(tmp_path):
    _run(tmp_path, FakeDevice({"ref": 10.0, "a": 5.0, "b": 2.0}), update=True)
    r = regress.run_regress(
        _suite(tmp_path, names=("ref", "a", "c")),
        get_device("cpu"),
        tmp_path / "baseline.json",
        measure_many=FakeDevice({"ref": 10.0, "a": 5.0, "c": 1.0}),
        fingerprint=FP,
        log=lambda m: None,
    )
    assert {v.name: v.status for v in r.verdicts} == {
        "ref": "ok",
        "a": "ok",
        "c": "new",
        "b": "missing",
    }
    assert not r.regressed


def test_missing_baseline_says_how_to_record_it(tmp_path):
    with pytest.raises(DeepLSPError, match="no baseline .* --update"):
        _run(tmp_path, FakeDevice({"ref": 1.0, "a": 1.0, "b": 1.0}))


@pytest.mark.parametrize(
    "text, message",
    [
        ('reference = "x"\n', "no \\[\\[model\\]\\]"),
        ('reference = "x"\n[[model]]\nname = "a"\nonnx = "a.onnx"\n', "reference 'x' is not"),
        ('reference = "a"\n[[model]]\nname = "a"\n', "either onnx = FILE or model = NAME"),
        ('reference = "a"\n[[model]]\nname = "a"\nmodel = "resnet18"\n', "needs dataset"),
        ('reference = "a"\n[[model]]\nname = "a"\nonnx = "a"\nkeep = 0\n', "keep must be"),
        ('reference = "a"\n[[model]]\nname = "a"\nonnx = "a"\ncolour = 1\n', "unknown key"),
        ('reference = "a"\nrounds = 2\n[[model]]\nname = "a"\nonnx = "a"\n', "rounds must be"),
        ('reference = "a"\nspeed = 2\n[[model]]\nname = "a"\nonnx = "a"\n', "unknown setting"),
        ("reference = \n", "not valid TOML"),
    ],
)
def test_bad_suites_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(DeepLSPError, match=message):
        regress.load_suite(path)


def test_cli_exit_codes(tmp_path, monkeypatch, capsys):
    suite = _suite(tmp_path)
    monkeypatch.setattr(regress, "_measure", FakeDevice({"ref": 10.0, "a": 5.0, "b": 2.0}))
    base = str(tmp_path / "b.json")
    assert main(["regress", str(suite), "--baseline", base, "--update"]) == 0
    assert main(["regress", str(suite), "--baseline", base]) == 0
    monkeypatch.setattr(regress, "_measure", FakeDevice({"ref": 10.0, "a": 9.0, "b": 2.0}))
    out = tmp_path / "report.json"
    assert main(["regress", str(suite), "--baseline", base, "--json", str(out)]) == 1
    assert json.loads(out.read_text())["regressed"] == ["a"]
    assert "REGRESSION on cpu: a" in capsys.readouterr().err
    assert main(["regress", str(tmp_path / "none.toml")]) == 2
    assert "cannot read suite" in capsys.readouterr().err


PLUGIN_TEST = """
import json
from pathlib import Path
from deeplsp import regress
from profiling.runner import LatencyStats

COST = json.loads(Path("cost.json").read_text())

def fake(device, paths, warmup, iters):
    for p in paths:
        yield LatencyStats.from_samples([COST[Path(p).stem]] * iters, warmup)

def test_suite(latency_regression, monkeypatch):
    monkeypatch.setattr(regress, "_measure", fake)
    latency_regression("suite.toml")
"""


def test_pytest_plugin_fails_on_regression_and_skips_without_baseline(pytester, tmp_path):
    _suite(pytester.path)
    pytester.makepyfile(test_latency=PLUGIN_TEST)
    (pytester.path / "cost.json").write_text('{"ref": 10, "a": 5, "b": 2}')
    pytester.runpytest().assert_outcomes(skipped=1)
    pytester.runpytest("--update-latency-baseline").assert_outcomes(passed=1)
    assert (pytester.path / "baseline-cpu.json").is_file()
    pytester.runpytest().assert_outcomes(passed=1)
    (pytester.path / "cost.json").write_text('{"ref": 10, "a": 8, "b": 2}')
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*latency regression on cpu*: a*"])


def test_a_slow_down_must_show_twice(tmp_path):
    """One unlucky run (every round of it slow for one model) is re-measured and
    forgiven; a slow-down that stays is a regression."""
    _run(tmp_path, FakeDevice({"ref": 10.0, "a": 5.0, "b": 2.0}), update=True)

    class Burst(FakeDevice):
        def __call__(self, device, paths, warmup, iters):
            first_run = not self.calls  # one measuring call per run
            self.cost["a"] = 7.0 if first_run else 5.1
            return super().__call__(device, paths, warmup, iters)

    burst = Burst({"ref": 10.0, "a": 5.0, "b": 2.0})
    r = _run(tmp_path, burst)
    assert len(burst.calls) == 2 and r.confirmation is not None and not r.regressed
    a = next(v for v in r.verdicts if v.name == "a")
    assert a.ratio == pytest.approx(0.51) and r.result.models["a"]["runs"] == pytest.approx(
        [0.7, 0.51]
    )
    steady = FakeDevice({"ref": 10.0, "a": 7.0, "b": 2.0})
    r = _run(tmp_path, steady)
    assert len(steady.calls) == 2 and [v.name for v in r.regressed] == ["a"]
    assert r.to_dict()["confirmation"]["models"]["a"]["ratio"] == pytest.approx(0.7)


def test_the_baseline_is_the_middle_of_several_runs(tmp_path):
    class Drifting(FakeDevice):  # model a reads 0.45, 0.5, 0.6 of the reference by run
        def __call__(self, device, paths, warmup, iters):
            self.cost["a"] = (4.5, 5.0, 6.0)[len(self.calls) % 3]
            return super().__call__(device, paths, warmup, iters)

    _run(tmp_path, Drifting({"ref": 10.0, "a": 5.0, "b": 2.0}), update=True)
    base = json.loads((tmp_path / "baseline.json").read_text())["models"]["a"]
    assert base["ratio"] == pytest.approx(0.5)
