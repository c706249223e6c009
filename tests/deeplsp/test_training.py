import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deeplsp.errors import DeepLSPError
from deeplsp.training import TrainConfig, evaluate, train


def _blobs(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 2, generator=g) * 0.3 + (y[:, None] * 2 - 1).float()
    return TensorDataset(x, y)


def test_training_learns_a_separable_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    loader = DataLoader(_blobs(), batch_size=16, shuffle=True)
    before = evaluate(model, loader, "cpu")
    out = train(model, loader, TrainConfig(epochs=3, lr=0.1, device="cpu", threads=1))
    after = evaluate(model, loader, "cpu")
    assert after["top1"] >= 0.95 and after["loss"] < before["loss"]
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3]
    assert out["history"][-1]["loss"] < out["history"][0]["loss"]
    assert out["device"] == "cpu"


def test_evaluate_top1_top5_on_known_logits():
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5], [1.0, 9, 2, 3, 4, 5], [6.0, 0, 1, 2, 3, 4]])
    labels = torch.tensor([0, 5, 1])  # right; 2nd choice; last of six (outside top-5)

    class Fixed(nn.Module):
        def forward(self, x):
            return logits[x.long().flatten()]

    loader = DataLoader(TensorDataset(torch.arange(3.0)[:, None], labels), batch_size=2)
    m = evaluate(Fixed(), loader, "cpu")
    assert m["n"] == 3 and m["top1"] == pytest.approx(1 / 3) and m["top5"] == pytest.approx(2 / 3)


def test_hooks_add_loss_and_run_after_each_step():
    class ZeroFirst:
        calls = 0

        def extra_loss(self, model, images, logits):
            assert logits.shape == (images.shape[0], 2)
            return 0.0 * model[0].weight.sum()

        def after_step(self, model):
            self.calls += 1
            with torch.no_grad():
                model[0].weight[0].zero_()

    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    hooks = ZeroFirst()
    loader = DataLoader(_blobs(32), batch_size=8)
    train(model, loader, TrainConfig(epochs=2, device="cpu"), hooks=hooks)
    assert hooks.calls == 8
    assert torch.count_nonzero(model[0].weight[0]) == 0


def test_divergence_is_reported():
    model = nn.Sequential(nn.Linear(2, 2))

    class Explode:
        def extra_loss(self, model, images, logits):
            return torch.tensor(float("nan"))

        def after_step(self, model):
            pass

    with pytest.raises(DeepLSPError, match="diverged"):
        train(
            model,
            DataLoader(_blobs(8), batch_size=4),
            TrainConfig(epochs=1, device="cpu"),
            hooks=Explode(),
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": -1}, "epochs"),
        ({"batch_size": 0}, "batch size"),
        ({"optimizer": "lion"}, "choose from: sgd, adamw"),
        ({"lr": 0}, "learning rate"),
        ({"threads": 0}, "threads"),
        ({"device": "tpu"}, "choose from: auto, cpu, cuda"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(DeepLSPError, match=match):
        TrainConfig(**kwargs)


def test_config_round_trips_through_dict():
    cfg = TrainConfig(epochs=2, optimizer="adamw", lr=1e-3)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(DeepLSPError, match="unknown training settings"):
        TrainConfig.from_dict({"epochz": 1})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(DeepLSPError, match="no CUDA GPU"):
        TrainConfig(device="cuda")
