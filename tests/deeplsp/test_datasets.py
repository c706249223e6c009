"""Tests for deeplsp.datasets on tiny files written in the real on-disk formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from deeplsp import datasets
from deeplsp.datasets import (
    DATASETS,
    calibration_batches,
    get_dataset,
    load_split,
    make_loader,
    read_idx,
    resolve_data_dir,
    safe_unpickle,
)
from deeplsp.errors import DeepLSPError, UnknownNameError

PER_BATCH = 10  # images per CIFAR batch file: 50 train, 10 test for CIFAR-10

# --------------------------------------------------------------------------- writers


def _cifar_rows(n: int, start: int) -> np.ndarray:
    """N x 3072 uint8 rows; R[0,0] holds the global index so images can be told apart."""
    rng = np.random.default_rng(start)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, 0] = np.arange(start, start + n, dtype=np.uint8)
    return data


def _dump(obj: object, path: Path, protocol: int) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10(root: Path, protocol: int = 2, str_keys: bool = False) -> Path:
    """<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}, like the tarball."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def key(k: str) -> str | bytes:
        return k if str_keys else k.encode()

    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, fname in enumerate(files):
        start = b * PER_BATCH
        batch = {
            key("batch_label"): f"training batch {b + 1} of 5".encode(),
            key("labels"): [(start + i) % 10 for i in range(PER_BATCH)],
            key("data"): _cifar_rows(PER_BATCH, start),
            key("filenames"): [f"img_{start + i}.png".encode() for i in range(PER_BATCH)],
        }
        _dump(batch, folder / fname, protocol)
    meta = {
        key("num_cases_per_batch"): PER_BATCH,
        key("label_names"): [f"class{i}".encode() for i in range(10)],
        key("num_vis"): 3072,
    }
    _dump(meta, folder / "batches.meta", protocol)
    return root


def write_cifar100(root: Path) -> Path:
    """<root>/cifar-100-python/{train,test,meta} with fine and coarse labels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for fname, n, start in (("train", 30, 0), ("test", 12, 100)):
        batch = {
            b"filenames": [f"x{i}.png".encode() for i in range(n)],
            b"batch_label": fname.encode(),
            b"fine_labels": [(start + 7 * i) % 100 for i in range(n)],
            b"coarse_labels": [i % 20 for i in range(n)],
            b"data": _cifar_rows(n, start),
        }
        _dump(batch, folder / fname, 2)
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    _dump(meta, folder / "meta", 2)
    return root


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x00000800 | array.ndim  # 0x08 = unsigned byte payload
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def fashion_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n, dtype=np.uint8)
    return images, np.arange(n, dtype=np.uint8) % 10


def write_fashion(folder: Path, gz: bool = True, n_train: int = 12, n_test: int = 6) -> Path:
    """The four IDX files Fashion-MNIST ships, gzipped like the Debian package or not."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = fashion_arrays(n, seed)
        for stem, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            raw = idx_bytes(arr)
            path = folder / f"{prefix}-{stem}"
            if gz:
                path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
            else:
                path.write_bytes(raw)
    return folder


IMAGENET_COLOURS = {"n01440764": (200, 30, 60), "n01443537": (10, 220, 128)}


def write_imagenet(root: Path, val_classes: tuple[str, ...] | None = None) -> Path:
    """<root>/{train,val}/<wnid>/*.JPEG: 2 classes x 2 solid-colour JPEGs of odd sizes."""
    for split in ("train", "val"):
        for wnid, colour in IMAGENET_COLOURS.items():
            if split == "val" and val_classes is not None and wnid not in val_classes:
                continue
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i, size in enumerate(((40, 30), (25, 50))):
                Image.new("RGB", size, colour).save(folder / f"{wnid}_{i}.JPEG", quality=95)
    return root


@pytest.fixture()
def cifar10_dir(tmp_path: Path) -> Path:
    return write_cifar10(tmp_path / "c10")


def norm(value: int, entry_name: str, channel: int) -> float:
    e = get_dataset(entry_name)
    return (value / 255.0 - e.mean[channel]) / e.std[channel]


# --------------------------------------------------------------------------- registry


def test_registry_has_the_four_datasets_with_consistent_fields() -> None:
    assert DATASETS.names() == ["cifar10", "cifar100", "fashionmnist", "imagenet"]
    for e in DATASETS:
        assert len(e.mean) == len(e.std) == e.in_channels
        assert e.description and e.default_dir_hint
    assert get_dataset("cifar100").num_classes == 100
    assert get_dataset("fashionmnist").input_size == 32
    assert (get_dataset("imagenet").input_size, get_dataset("imagenet").num_classes) == (224, 1000)


def test_unknown_dataset_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError) as info:
        get_dataset("mnist")
    msg = str(info.value)
    assert "'mnist'" in msg
    for name in ("cifar10", "cifar100", "fashionmnist", "imagenet"):
        assert name in msg
    with pytest.raises(DeepLSPError, match="cifar10, cifar100"):
        load_split("svhn", "train", tmp_path)


def test_unknown_split_is_refused(cifar10_dir: Path) -> None:
    with pytest.raises(DeepLSPError, match="unknown split 'val'"):
        load_split("cifar10", "val", cifar10_dir)


def test_resolve_data_dir_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_data_dir("cifar10", None) == Path("data/cifar10")
    assert resolve_data_dir("imagenet", None) == Path("data/imagenet")
    assert resolve_data_dir("cifar100", tmp_path) == tmp_path
    write_fashion(tmp_path / "FashionMNIST" / "raw")
    assert resolve_data_dir("fashionmnist", tmp_path) == tmp_path / "FashionMNIST" / "raw"
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir("fashionmnist", None) == Path("data/FashionMNIST/raw")


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_sizes_shapes_dtypes_labels(cifar10_dir: Path) -> None:
    train = load_split("cifar10", "train", cifar10_dir)
    test = load_split("cifar10", "test", cifar10_dir)
    assert (len(train), len(test)) == (5 * PER_BATCH, PER_BATCH)
    for ds, offset in ((train, 0), (test, 5 * PER_BATCH)):
        for i in (0, len(ds) - 1):
            image, label = ds[i]
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert type(image) is torch.Tensor
            assert type(label) is int and label == (offset + i) % 10
    assert train.images.dtype == torch.uint8 and train.images.shape == (50, 3, 32, 32)
    assert train.classes == [f"class{i}" for i in range(10)]


def test_cifar_row_layout_and_normalisation_round_trip(tmp_path: Path) -> None:
    """Rows are R, G, B planes of 32x32 row-major; a known pixel survives eval transforms."""
    root = write_cifar10(tmp_path)
    path = root / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(path.read_bytes())
    data = batch[b"data"]
    y, x = 5, 17
    data[3, :] = 0
    data[3, y * 32 + x] = 255  # R
    data[3, 1024 + y * 32 + x] = 128  # G
    data[3, 2048 + y * 32 + x] = 7  # B
    _dump(batch, path, 2)

    image, _ = load_split("cifar10", "test", root)[3]
    for c, value in enumerate((255, 128, 7)):
        assert image[c, y, x].item() == pytest.approx(norm(value, "cifar10", c), abs=1e-5)
        assert image[c, 0, 0].item() == pytest.approx(norm(0, "cifar10", c), abs=1e-5)
    assert image[0, x, y].item() == pytest.approx(norm(0, "cifar10", 0), abs=1e-5)


@pytest.mark.parametrize(
    ("protocol", "str_keys"), [(2, False), (2, True), (4, False), (5, True)], ids=str
)
def test_cifar_pickle_protocols_and_key_types(tmp_path: Path, protocol: int, str_keys: bool):
    root = write_cifar10(tmp_path, protocol=protocol, str_keys=str_keys)
    ds = load_split("cifar10", "train", root, subset=None)
    assert len(ds) == 50
    assert ds.images[13, 0, 0, 0].item() == 13
    assert ds[13][1] == 3


def test_cifar_legacy_numpy_core_module_path(tmp_path: Path) -> None:
    """The real files name numpy.core.multiarray._reconstruct (numpy 1.x); that must load."""
    root = write_cifar10(tmp_path)
    path = root / "cifar-10-batches-py" / "data_batch_2"
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    ds = load_split("cifar10", "train", root)
    assert ds.images[PER_BATCH, 0, 0, 0].item() == PER_BATCH


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    root = write_cifar100(tmp_path)
    train = load_split("cifar100", "train", root)
    test = load_split("cifar100", "test", root)
    assert (len(train), len(test)) == (30, 12)
    assert [train[i][1] for i in range(30)] == [(7 * i) % 100 for i in range(30)]
    assert test[5][1] == (100 + 35) % 100
    image, _ = test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert test.classes[99] == "fine99"


class _Payload:
    """Pickles as a call to `func(*args)`: what a hostile CIFAR file would contain."""

    def __init__(self, func: object, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_restricted_unpickler_refuses_code(tmp_path: Path, kind: str) -> None:
    root = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    if kind == "os.system":
        payload = _Payload(os.system, (f"touch {marker}",))
        named, protocol = f"{os.system.__module__}.system", 2
    else:
        payload = _Payload(exec, (f"open({str(marker)!r}, 'w').close()",))
        named, protocol = "builtins.exec", 4  # protocol 2 would spell it __builtin__.exec
    evil = {b"data": payload, b"labels": [0]}
    # The payload is live: plain pickle would run it.
    pickle.loads(pickle.dumps(evil, protocol=protocol))
    assert marker.exists()
    marker.unlink()

    path = root / "cifar-10-batches-py" / "data_batch_3"
    _dump(evil, path, protocol)
    with pytest.raises(DeepLSPError) as info:
        load_split("cifar10", "train", root)
    assert str(info.value) == f"refusing to unpickle {named} from {path}"
    assert not marker.exists()
    with pytest.raises(DeepLSPError, match="refusing to unpickle"):
        safe_unpickle(path)
    assert not marker.exists()


def test_truncated_cifar_pickle_is_a_user_error(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path)
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DeepLSPError, match="test_batch"):
        load_split("cifar10", "test", root)


def test_missing_cifar_names_the_path_and_the_fixes(tmp_path: Path) -> None:
    with pytest.raises(DeepLSPError) as info:
        load_split("cifar10", "train", tmp_path / "nowhere")
    msg = str(info.value)
    expected = (tmp_path / "nowhere" / "cifar-10-batches-py" / "data_batch_1").resolve()
    assert str(expected) in msg
    assert "--download" in msg and "cifar-10-python.tar.gz" in msg and "--data-dir" in msg
    with pytest.raises(DeepLSPError, match="cifar-100-python/test.*cifar-100-python.tar.gz"):
        load_split("cifar100", "test", tmp_path)


def test_cifar_download_uses_torchvision_url_and_md5(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_download(url: str, download_root: str, filename: str, md5: str) -> None:
        calls.append((url, filename, md5))
        write_cifar10(Path(download_root))

    monkeypatch.setattr(datasets.tv_utils, "download_and_extract_archive", fake_download)
    ds = load_split("cifar10", "test", tmp_path / "dl", download=True)
    assert len(ds) == PER_BATCH
    tv = datasets.tvd.CIFAR10
    assert calls == [(tv.url, "cifar-10-python.tar.gz", tv.tgz_md5)]
    load_split("cifar10", "train", tmp_path / "dl", download=True)  # files present: no 2nd call
    assert len(calls) == 1


def test_cifar_download_failure_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(datasets.tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DeepLSPError, match="cifar100: download to .* failed.*unreachable"):
        load_split("cifar100", "train", tmp_path, download=True)


# --------------------------------------------------------------------------- subset / augment


def test_subset_is_seeded_and_sized(cifar10_dir: Path) -> None:
    def ids(ds: Subset) -> list[int]:
        return [int(ds.dataset.images[i, 0, 0, 0]) for i in ds.indices]

    a = load_split("cifar10", "train", cifar10_dir, subset=7, seed=3)
    b = load_split("cifar10", "train", cifar10_dir, subset=7, seed=3)
    c = load_split("cifar10", "train", cifar10_dir, subset=7, seed=4)
    assert isinstance(a, Subset) and len(a) == 7
    assert ids(a) == ids(b) != ids(c)
    assert len(set(ids(a))) == 7
    assert [a[i][1] for i in range(7)] == [i % 10 for i in ids(a)]
    whole = load_split("cifar10", "train", cifar10_dir, subset=1000)
    assert len(whole) == 50


@pytest.mark.parametrize("bad", [0, -5])
def test_non_positive_subset_is_refused(cifar10_dir: Path, bad: int) -> None:
    with pytest.raises(DeepLSPError, match="subset"):
        load_split("cifar10", "train", cifar10_dir, subset=bad)


def test_augmentation_only_on_train(cifar10_dir: Path) -> None:
    torch.manual_seed(0)
    train = load_split("cifar10", "train", cifar10_dir)
    train_plain = load_split("cifar10", "train", cifar10_dir, train_augment=False)
    test = load_split("cifar10", "test", cifar10_dir)
    test_aug = load_split("cifar10", "test", cifar10_dir, train_augment=True)

    reference = train_plain[4][0]
    assert all(torch.equal(train_plain[4][0], reference) for _ in range(5))
    draws = [train[4][0] for _ in range(20)]
    assert all(d.shape == (3, 32, 32) and d.dtype == torch.float32 for d in draws)
    assert any(not torch.equal(d, reference) for d in draws)

    eval_image = test[2][0]
    assert all(torch.equal(test[2][0], eval_image) for _ in range(5))
    assert any(not torch.equal(test_aug[2][0], eval_image) for _ in range(20))


# --------------------------------------------------------------------------- loaders


def test_make_loader_batches_and_seeded_shuffle(cifar10_dir: Path) -> None:
    ds = load_split("cifar10", "test", cifar10_dir)
    batches = list(make_loader(ds, 4, shuffle=False))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.cat([y for _, y in batches]).tolist() == [(50 + i) % 10 for i in range(10)]

    train = load_split("cifar10", "train", cifar10_dir, train_augment=False)

    e = get_dataset("cifar10")

    def order(seed: int) -> list[int]:
        """Image ids (stored in R[0,0]) in the order a shuffled loader yields them."""
        loader = make_loader(train, 8, shuffle=True, seed=seed)
        pixels = torch.cat([xb[:, 0, 0, 0] for xb, _ in loader])
        return ((pixels * e.std[0] + e.mean[0]) * 255).round().int().tolist()

    assert order(1) == order(1) != order(2)
    assert sorted(order(1)) == list(range(50)) == sorted(order(2))


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_batch_size_is_refused(cifar10_dir: Path, bad: int) -> None:
    ds = load_split("cifar10", "test", cifar10_dir)
    with pytest.raises(DeepLSPError, match="batch size"):
        make_loader(ds, bad, shuffle=False)
    with pytest.raises(DeepLSPError, match="batch size"):
        calibration_batches("cifar10", cifar10_dir, batch_size=bad)


def _images(batches: list) -> list[torch.Tensor]:
    assert all(len(x) == len(y) for x, y in batches)  # every batch carries its labels
    return [x for x, _ in batches]


def test_calibration_batches_are_deterministic_real_eval_images(cifar10_dir: Path) -> None:
    torch.manual_seed(123)
    a = _images(calibration_batches("cifar10", cifar10_dir, n_batches=3, batch_size=4, seed=0))
    torch.manual_seed(456)
    b = _images(calibration_batches("cifar10", cifar10_dir, n_batches=3, batch_size=4, seed=0))
    assert len(a) == 3 and all(t.shape == (4, 3, 32, 32) for t in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    eval_train = load_split("cifar10", "train", cifar10_dir, train_augment=False)
    pool = torch.stack([eval_train[i][0] for i in range(len(eval_train))])
    for image in torch.cat(a):
        assert (pool == image).flatten(1).all(1).any()  # an exact, un-augmented train image
    c = _images(calibration_batches("cifar10", cifar10_dir, n_batches=3, batch_size=4, seed=1))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    everything = _images(calibration_batches("cifar10", cifar10_dir, n_batches=20, batch_size=16))
    assert [len(t) for t in everything] == [16, 16, 16, 2]
    with pytest.raises(DeepLSPError, match="n_batches"):
        calibration_batches("cifar10", cifar10_dir, n_batches=0)


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("layout", ["flat-gz", "torchvision-raw", "flat-uncompressed"])
def test_fashion_idx_shapes_padding_and_values(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision-raw" else tmp_path
    write_fashion(folder, gz=layout != "flat-uncompressed")
    train = load_split("fashionmnist", "train", tmp_path)
    test = load_split("fashionmnist", "test", tmp_path)
    assert (len(train), len(test)) == (12, 6)
    images, labels = fashion_arrays(6, 2)
    image, label = test[5]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert type(label) is int and label == int(labels[5])
    # 2-pixel zero border from the padding, then the original 28x28 image.
    border = norm(0, "fashionmnist", 0)
    assert torch.allclose(image[0, :2, :], torch.full((2, 32), border))
    assert torch.allclose(image[0, :, 30:], torch.full((32, 2), border))
    expected = (torch.from_numpy(images[5]).float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(image[0, 2:30, 2:30], expected, atol=1e-5)


def test_fashion_train_augmentation_shifts_and_flips(tmp_path: Path) -> None:
    write_fashion(tmp_path)
    torch.manual_seed(0)
    train = load_split("fashionmnist", "train", tmp_path)
    plain = load_split("fashionmnist", "train", tmp_path, train_augment=False)
    draws = [train[0][0] for _ in range(20)]
    assert all(d.shape == (1, 32, 32) for d in draws)
    assert any(not torch.equal(d, plain[0][0]) for d in draws)


def _corrupt(kind: str, folder: Path) -> Path:
    """Break one of the freshly written files; return the path the error must name."""
    images = folder / "train-images-idx3-ubyte.gz"
    labels = folder / "train-labels-idx1-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    if kind == "bad-magic":
        images.write_bytes(gzip.compress(struct.pack(">I", 0x00000802) + raw[4:]))
    elif kind == "truncated-payload":
        images.write_bytes(gzip.compress(raw[:-100]))
    elif kind == "trailing-bytes":
        images.write_bytes(gzip.compress(raw + b"\0\0\0"))
    elif kind == "truncated-gzip":
        images.write_bytes(images.read_bytes()[:-40])
    elif kind == "short-header":
        images.write_bytes(gzip.compress(raw[:9]))
    elif kind == "not-28x28":
        arr = np.zeros((12, 20, 20), dtype=np.uint8)
        images.write_bytes(gzip.compress(idx_bytes(arr)))
    elif kind == "count-mismatch":
        labels.write_bytes(gzip.compress(idx_bytes(np.zeros(11, dtype=np.uint8))))
    elif kind == "label-out-of-range":
        labels.write_bytes(gzip.compress(idx_bytes(np.full(12, 10, dtype=np.uint8))))
        return labels
    return images


@pytest.mark.parametrize(
    "kind",
    [
        "bad-magic",
        "truncated-payload",
        "trailing-bytes",
        "truncated-gzip",
        "short-header",
        "not-28x28",
        "count-mismatch",
        "label-out-of-range",
    ],
)
def test_corrupt_idx_is_a_user_error_naming_the_file(tmp_path: Path, kind: str) -> None:
    write_fashion(tmp_path)
    named = _corrupt(kind, tmp_path)
    with pytest.raises(DeepLSPError) as info:
        load_split("fashionmnist", "train", tmp_path)
    assert str(named) in str(info.value)
    load_split("fashionmnist", "test", tmp_path)  # the untouched split still loads


def test_read_idx_parses_header_and_payload(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(path, 3), arr)
    with pytest.raises(DeepLSPError, match="magic 0x00000803, expected 0x00000801"):
        read_idx(path, 1)


def test_missing_fashion_names_the_searched_paths(tmp_path: Path) -> None:
    with pytest.raises(DeepLSPError) as info:
        load_split("fashionmnist", "test", tmp_path / "empty")
    msg = str(info.value)
    assert str((tmp_path / "empty").resolve()) in msg
    assert str((tmp_path / "empty" / "FashionMNIST" / "raw").resolve()) in msg
    assert "t10k-images-idx3-ubyte" in msg and "--download" in msg


def test_fashion_default_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_fashion(tmp_path / "data" / "FashionMNIST" / "raw", n_train=12)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    assert len(load_split("fashionmnist", "train")) == 12
    write_fashion(tmp_path / "debian", n_train=8)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    assert len(load_split("fashionmnist", "train")) == 8  # the system copy comes first


def test_fashion_download_reads_torchvision_raw_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    class FakeFashionMNIST:
        def __init__(self, root: str, download: bool) -> None:
            calls.append((root, download))
            write_fashion(Path(root) / "FashionMNIST" / "raw", gz=False)

    monkeypatch.setattr(datasets.tvd, "FashionMNIST", FakeFashionMNIST)
    ds = load_split("fashionmnist", "train", tmp_path / "dl", download=True)
    assert len(ds) == 12 and calls == [(str(tmp_path / "dl"), True)]


REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (REAL_FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"real Fashion-MNIST not at {REAL_FASHION} (apt install dataset-fashion-mnist)",
)
def test_real_debian_fashion_mnist() -> None:
    train = load_split("fashionmnist", "train")
    test = load_split("fashionmnist", "test", REAL_FASHION)
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    pixels = train.images.float() / 255
    entry = get_dataset("fashionmnist")
    assert pixels.mean().item() == pytest.approx(entry.mean[0], abs=1e-3)
    assert pixels.std().item() == pytest.approx(entry.std[0], abs=1e-3)
    image, label = test[0]
    assert image.shape == (1, 32, 32) and label == 9  # the first test image is an ankle boot


# --------------------------------------------------------------------------- ImageNet


def test_imagenet_folder_loads_with_eval_and_train_transforms(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path / "imagenet")
    val = load_split("imagenet", "test", root)
    train = load_split("imagenet", "train", root)
    assert (len(val), len(train)) == (4, 4)
    assert [val[i][1] for i in range(4)] == [0, 0, 1, 1]
    image, label = val[2]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    assert type(label) is int and type(image) is torch.Tensor
    for c, value in enumerate(IMAGENET_COLOURS["n01443537"]):  # solid colour, JPEG ~exact
        assert image[c].mean().item() == pytest.approx(norm(value, "imagenet", c), abs=0.05)
    aug, _ = train[0]
    assert aug.shape == (3, 224, 224) and aug.dtype == torch.float32
    assert get_dataset("imagenet").num_classes == 1000


def test_imagenet_partial_val_keeps_train_class_indices(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path, val_classes=("n01443537",))
    val = load_split("imagenet", "test", root)
    assert [val[i][1] for i in range(len(val))] == [1, 1]


def test_imagenet_missing_dir_names_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(DeepLSPError) as info:
        load_split("imagenet", "test", tmp_path / "in1k")
    msg = str(info.value)
    assert str((tmp_path / "in1k" / "val").resolve()) in msg
    assert "<wnid>" in msg and "--data-dir" in msg
    (tmp_path / "in1k" / "val").mkdir(parents=True)
    with pytest.raises(DeepLSPError, match="no class folders"):
        load_split("imagenet", "test", tmp_path / "in1k")
    with pytest.raises(DeepLSPError, match="cannot be downloaded"):
        load_split("imagenet", "test", tmp_path / "in1k", download=True)
