import pickle

import pytest
import torch

from deeplsp.checkpoint import load_checkpoint, save_checkpoint
from deeplsp.errors import DeepLSPError
from deeplsp.models import build_model

BUILD = {"num_classes": 10, "in_channels": 1, "input_size": 32}


def test_round_trip_rebuilds_the_same_model(tmp_path):
    model = build_model("resnet18", **BUILD).eval()
    path = save_checkpoint(
        tmp_path / "a" / "dense.pt",
        model,
        "resnet18",
        BUILD,
        dataset="fashionmnist",
        metrics={"top1": 0.5},
    )
    ckpt = load_checkpoint(path, expect_model="resnet18")
    assert ckpt.model_name == "resnet18" and ckpt.dataset == "fashionmnist"
    assert ckpt.metrics == {"top1": 0.5} and ckpt.input_shape == (1, 32, 32)
    rebuilt = ckpt.build_model().eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert not list(tmp_path.glob("a/.*.tmp"))


def test_checkpoint_for_another_model_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", build_model("resnet18", **BUILD), "resnet18", BUILD)
    with pytest.raises(DeepLSPError, match="holds a resnet18 checkpoint, not vgg16"):
        load_checkpoint(path, expect_model="vgg16")


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(DeepLSPError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DeepLSPError, match="not a readable checkpoint"):
        load_checkpoint(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(DeepLSPError, match="not a DeepLSP checkpoint"):
        load_checkpoint(plain)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickled_code_is_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "deeplsp.checkpoint/1", "payload": _Evil()}, path)
    with pytest.raises(DeepLSPError, match="not a readable checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(DeepLSPError):
        load_checkpoint(raw)
    assert not (tmp_path / "PWNED").exists()


def test_weights_that_do_not_fit_the_build(tmp_path):
    model = build_model("resnet18", **BUILD)
    path = save_checkpoint(tmp_path / "m.pt", model, "resnet18", {**BUILD, "num_classes": 5})
    with pytest.raises(DeepLSPError, match="do not fit resnet18"):
        load_checkpoint(path).build_model()


def test_failed_save_leaves_previous_file(tmp_path, monkeypatch):
    model = build_model("resnet18", **BUILD)
    path = save_checkpoint(tmp_path / "m.pt", model, "resnet18", BUILD)
    before = path.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, "resnet18", BUILD)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
