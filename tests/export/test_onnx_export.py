"""ONNX export: one checked, verified, atomically written file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export.onnx_export as onnx_export
from deeplsp.errors import DeepLSPError
from export import ExportResult, export_onnx, load_onnx_checked, verify_onnx
from tests.tiny_models import TinyCNN

SHAPE = (1, 3, 8, 8)


class LiesToExporters(TinyCNN):
    """Exports a graph that computes something else than the eager model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + 1 if torch.onnx.is_in_onnx_export() else y


class DataDependentBranch(TinyCNN):
    """torch.export rejects the data-dependent `if`; TorchScript tracing records the branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if y.abs().sum() >= 0:  # always true, but only known at run time
            return y
        return -y


class Unexportable(TinyCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this model cannot be traced")


def tiny(cls: type[TinyCNN] = TinyCNN) -> TinyCNN:
    torch.manual_seed(0)
    model = cls()
    with torch.no_grad():  # non-trivial BN so folding it into the conv is exercised
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.bias.uniform_(-1, 1)
    return model


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_round_trip_tiny_cnn(tmp_path: Path) -> None:
    model = tiny().train()
    model.fc.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "new" / "dir" / "tiny.onnx"

    result = export_onnx(model, SHAPE, path, seed=1)

    assert result.path == path and result.exporter == "dynamo" and result.opset == 18
    assert result.input_shape == SHAPE and not result.simplified
    assert result.size_bytes == path.stat().st_size
    assert result.max_abs_diff is not None and 0 <= result.max_abs_diff < 1e-5
    assert (result.atol, result.checks) == (1e-3, 3)
    # single self-contained file: no external-data sidecar, no temp files
    assert leftovers(path.parent) == ["tiny.onnx"]
    proto = load_onnx_checked(path)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert tuple(dims) == SHAPE  # static batch

    # the caller's model keeps its modes and weights (BN stats would move in train mode)
    assert model.training and model.bn.training and not model.fc.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())

    x = torch.randn(SHAPE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = model.eval()(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)

    record = json.loads(json.dumps(result.to_dict()))
    assert record["path"] == str(path) and record["input_shape"] == list(SHAPE)
    assert record["exporter"] == "dynamo" and record["max_abs_diff"] == result.max_abs_diff


def test_simplify(tmp_path: Path) -> None:
    result = export_onnx(tiny(), SHAPE, tmp_path / "s.onnx", simplify=True, checks=1)
    assert result.simplified and result.checks == 1
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-5
    proto = load_onnx_checked(result.path)
    assert [o.name for o in proto.graph.output] == ["logits"]


def test_without_verification(tmp_path: Path) -> None:
    result = export_onnx(tiny(LiesToExporters), SHAPE, tmp_path / "v.onnx", verify=False)
    assert result.max_abs_diff is None and result.checks == 0 and result.path.exists()


def test_wrong_graph_fails_verification_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    with pytest.raises(DeepLSPError, match=r"max abs diff 1 > atol 0\.001"):
        export_onnx(tiny(LiesToExporters), SHAPE, path)
    assert leftovers(tmp_path) == []


def test_failure_keeps_the_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous model")

    def fail(*args: object, **kwargs: object) -> float:
        assert leftovers(tmp_path) != ["m.onnx"]  # the new file exists, but elsewhere
        raise DeepLSPError("verification failed")

    monkeypatch.setattr(onnx_export, "verify_onnx", fail)
    with pytest.raises(DeepLSPError, match="verification failed"):
        export_onnx(tiny(), SHAPE, path)
    assert path.read_bytes() == b"previous model"
    assert leftovers(tmp_path) == ["m.onnx"]


def test_interrupt_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*args: object, **kwargs: object) -> float:
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "verify_onnx", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny(), SHAPE, tmp_path / "m.onnx")
    assert leftovers(tmp_path) == []


def test_falls_back_to_the_legacy_exporter(tmp_path: Path) -> None:
    result = export_onnx(tiny(DataDependentBranch), SHAPE, tmp_path / "m.onnx")
    assert result.exporter == "legacy"
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-5
    proto = load_onnx_checked(result.path)
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert leftovers(tmp_path) == ["m.onnx"]


def test_opset_below_18_uses_the_legacy_exporter(tmp_path: Path) -> None:
    result = export_onnx(tiny(), SHAPE, tmp_path / "m.onnx", opset=13, checks=1)
    assert (result.exporter, result.opset) == ("legacy", 13)
    proto = load_onnx_checked(result.path)
    assert [(o.domain, o.version) for o in proto.opset_import if o.domain == ""] == [("", 13)]


def test_both_exporters_failing_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(DeepLSPError, match="dynamo: .*legacy: .*cannot be traced") as err:
        export_onnx(tiny(Unexportable), SHAPE, tmp_path / "m.onnx")
    assert "\n" not in str(err.value)
    assert leftovers(tmp_path) == []


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DeepLSPError, match="directory"):
        export_onnx(tiny(), SHAPE, tmp_path)
    with pytest.raises(DeepLSPError, match="positive"):
        export_onnx(tiny(), (0, 3, 8, 8), tmp_path / "m.onnx")
    with pytest.raises(DeepLSPError, match="checks"):
        export_onnx(tiny(), SHAPE, tmp_path / "m.onnx", checks=0)


def test_verify_onnx(tmp_path: Path) -> None:
    result = export_onnx(tiny(), SHAPE, tmp_path / "m.onnx", verify=False)
    data = result.path.read_bytes()
    assert verify_onnx(tiny(), data, SHAPE) < 1e-5
    assert verify_onnx(tiny(), result.path, SHAPE, checks=1) < 1e-5

    other = TinyCNN()  # different weights
    with pytest.raises(DeepLSPError, match="max abs diff .* > atol 0.001"):
        verify_onnx(other, data, SHAPE)
    diff = verify_onnx(other, data, SHAPE, atol=1e9)
    assert 1e-3 < diff < 1e9
    with pytest.raises(DeepLSPError, match="ONNX Runtime cannot load"):
        verify_onnx(other, b"not onnx", SHAPE)


@pytest.mark.parametrize("content", [None, b"", b"\x08garbage\xff\xfe not protobuf"])
def test_load_onnx_checked_rejects(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DeepLSPError, match="is not a valid ONNX model: .+") as err:
        load_onnx_checked(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_export_result_is_frozen(tmp_path: Path) -> None:
    result = ExportResult(tmp_path, SHAPE, 18, "dynamo", False, 1, None, 1e-3, 0)
    with pytest.raises(AttributeError):
        result.opset = 17  # type: ignore[misc]


@pytest.mark.gpu
def test_model_on_gpu_stays_there(tmp_path: Path) -> None:
    model = tiny().cuda()
    result = export_onnx(model, SHAPE, tmp_path / "m.onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert all(p.is_cuda for p in model.parameters())
