"""Datasets for training, evaluation and calibration: CIFAR-10/100, Fashion-MNIST, ImageNet.

Each dataset is read from its real on-disk format (CIFAR "python version" pickles,
IDX files, an ImageFolder tree) so that nothing downloads unless asked to
(`download=True`, i.e. `--download`). Every sample is `(image, label)`: a float32
CHW tensor normalised with the entry's mean/std, and a Python int.

The CIFAR pickles are read with a restricted unpickler that only rebuilds numpy
arrays, because a plain `pickle.load` would run whatever code the file names.
"""

from __future__ import annotations

import codecs
import gzip
import importlib
import io
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets as tvd
from torchvision.datasets import ImageFolder
from torchvision.datasets import utils as tv_utils
from torchvision.transforms import v2

from deeplsp.errors import DeepLSPError
from deeplsp.registry import Registry

SPLITS = ("train", "test")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetEntry:
    """What a model and the loaders need to know about one dataset."""

    name: str
    description: str
    num_classes: int
    in_channels: int
    input_size: int  # side of the square image the model sees
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_dir_hint: str  # where the files go / how to get them, quoted in errors

    def model_args(self) -> dict[str, int]:
        """The build arguments a model for this dataset takes (and a checkpoint records)."""
        return {
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "input_size": self.input_size,
        }


DATASETS: Registry[DatasetEntry] = Registry("dataset")

DATASETS.register(
    DatasetEntry(
        name="cifar10",
        description="CIFAR-10: 50k/10k 32x32 RGB images, 10 classes",
        num_classes=10,
        in_channels=3,
        input_size=32,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        default_dir_hint=(
            "./data/cifar10/cifar-10-batches-py/ (extract cifar-10-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html there, or use --download)"
        ),
    )
)
DATASETS.register(
    DatasetEntry(
        name="cifar100",
        description="CIFAR-100: 50k/10k 32x32 RGB images, 100 fine classes",
        num_classes=100,
        in_channels=3,
        input_size=32,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        default_dir_hint=(
            "./data/cifar100/cifar-100-python/ (extract cifar-100-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html there, or use --download)"
        ),
    )
)
DATASETS.register(
    DatasetEntry(
        name="fashionmnist",
        description="Fashion-MNIST: 60k/10k 28x28 grayscale images padded to 32x32, 10 classes",
        num_classes=10,
        in_channels=1,
        input_size=32,
        mean=(0.2860,),
        std=(0.3530,),
        default_dir_hint=(
            f"{DEBIAN_FASHION_MNIST} (apt install dataset-fashion-mnist) or "
            "./data/FashionMNIST/raw/ (the four *-idx?-ubyte[.gz] files, or use --download)"
        ),
    )
)
DATASETS.register(
    DatasetEntry(
        name="imagenet",
        description="ImageNet-1k (ILSVRC2012) as train/ and val/ folders of WordNet-id classes",
        num_classes=1000,
        in_channels=3,
        input_size=224,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        default_dir_hint=(
            "./data/imagenet/{train,val}/<wnid>/<image>.JPEG "
            "(e.g. val/n01440764/ILSVRC2012_val_00000293.JPEG); it cannot be downloaded"
        ),
    )
)


def get_dataset(name: str) -> DatasetEntry:
    """Look a dataset up by name; an unknown name raises an error listing the valid ones."""
    return DATASETS.get(name)


# --------------------------------------------------------------------------- data dirs


def _fashion_candidates(data_dir: str | Path | None) -> list[Path]:
    """Folders that may hold the Fashion-MNIST IDX files, in search order."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        return [root, root / "FashionMNIST" / "raw"]
    return [DEBIAN_FASHION_MNIST, Path("data") / "FashionMNIST" / "raw"]


def resolve_data_dir(name: str, data_dir: str | Path | None) -> Path:
    """The folder a dataset is read from (or downloaded into), so errors and logs can name it.

    For cifar10/cifar100/imagenet it is `data_dir` or `./data/<name>`. For fashionmnist
    it is the first folder of the search order (data_dir, data_dir/FashionMNIST/raw; or,
    without data_dir, the Debian package folder then ./data/FashionMNIST/raw) that holds
    the training images, else the last candidate, where `--download` puts them.
    """
    get_dataset(name)
    if name == "fashionmnist":
        candidates = _fashion_candidates(data_dir)
        for folder in candidates:
            if _find_idx(folder, "train-images-idx3-ubyte") is not None:
                return folder
        return candidates[-1]
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path("data") / name


# --------------------------------------------------------------------------- transforms


def _to_float_normalised(entry: DatasetEntry) -> list[Any]:
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(entry.mean), std=list(entry.std)),
        v2.ToPureTensor(),
    ]


def _build_transform(entry: DatasetEntry, augment: bool) -> Callable[[Any], torch.Tensor]:
    """Per-dataset train/eval transforms; uint8 tensors stay tensors (no PIL round trip)."""
    steps: list[Any]
    if entry.name in ("cifar10", "cifar100"):
        steps = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if augment else []
    elif entry.name == "fashionmnist":
        # 28x28 -> 32x32 first, so augmentation shifts by up to 2 px around the padded image.
        steps = [v2.Pad(2)]
        if augment:
            steps += [v2.RandomCrop(32, padding=2), v2.RandomHorizontalFlip()]
    elif entry.name == "imagenet":
        steps = [v2.ToImage()]
        if augment:
            steps += [v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()]
        else:
            steps += [v2.Resize(256, antialias=True), v2.CenterCrop(224)]
    else:  # pragma: no cover - every registered entry is handled above
        raise DeepLSPError(f"no transforms defined for dataset {entry.name!r}")
    return v2.Compose(steps + _to_float_normalised(entry))


class TensorImageDataset(Dataset):
    """Images held in memory as uint8 N x C x H x W, transformed per sample on access."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor],
        classes: list[str],
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DeepLSPError(f"expected uint8 N x C x H x W images, got {tuple(images.shape)}")
        if len(images) != len(labels):
            raise DeepLSPError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


# --------------------------------------------------------------------------- CIFAR


# (module, name) a pickle may name -> the numpy attribute it means. numpy 1.x wrote
# numpy.core.*, numpy 2.x writes numpy._core.*; both resolve against the installed numpy.
_ALLOWED_GLOBALS: dict[tuple[str, str], tuple[str, str]] = {
    ("numpy", "ndarray"): ("", "ndarray"),
    ("numpy", "dtype"): ("", "dtype"),
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = ("multiarray", "_reconstruct")
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "scalar")] = ("multiarray", "scalar")
    _ALLOWED_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = ("numeric", "_frombuffer")


def _numpy_global(submodule: str, name: str) -> Any:
    if not submodule:
        return getattr(np, name)
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise DeepLSPError(f"this numpy has no {submodule}.{name} to unpickle arrays with")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and plain containers, and nothing else.

    Pickles name callables that loading then calls (os.system, eval, ...); refusing every
    global outside a short numpy allow-list makes a CIFAR file only able to yield data.
    """

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles spell bytes
            return codecs.encode
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise DeepLSPError(f"refusing to unpickle {module}.{name} from {self.source}")
        return _numpy_global(*target)


def safe_unpickle(path: Path) -> Any:
    """Load a data pickle with `RestrictedUnpickler`; broken files become DeepLSPError."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, str(path)).load()
    except DeepLSPError:
        raise
    except Exception as exc:  # truncated or not a pickle at all
        raise DeepLSPError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None


def _str_keys(obj: Any, path: Path) -> dict[str, Any]:
    """Real CIFAR files decode to str keys with latin1; files written from Python 3 have bytes."""
    if not isinstance(obj, dict):
        raise DeepLSPError(f"{path} does not hold a dict (got {type(obj).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


_CIFAR_LAYOUT = {
    # name: (folder, train files, test file, meta file, label key, class-names key, archive)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
        "cifar-10-python.tar.gz",
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        "test",
        "meta",
        "fine_labels",
        "fine_label_names",
        "cifar-100-python.tar.gz",
    ),
}


def _download_cifar(name: str, root: Path) -> None:
    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    try:
        root.mkdir(parents=True, exist_ok=True)
        tv_utils.download_and_extract_archive(
            cls.url, download_root=str(root), filename=cls.filename, md5=cls.tgz_md5
        )
    except Exception as exc:
        raise DeepLSPError(
            f"{name}: download to {root} failed ({type(exc).__name__}: {exc}); "
            f"copy the extracted {cls.filename} into {root} instead"
        ) from None


def _load_cifar(
    entry: DatasetEntry, split: str, root: Path, download: bool
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    folder_name, train_files, test_file, meta_file, label_key, names_key, archive = _CIFAR_LAYOUT[
        entry.name
    ]
    folder = root / folder_name
    files = train_files if split == "train" else [test_file]
    if download and not all((folder / f).is_file() for f in files):
        _download_cifar(entry.name, root)
    datas, labels = [], []
    for fname in files:
        path = folder / fname
        if not path.is_file():
            raise DeepLSPError(
                f"{entry.name}: missing {path.resolve()}; pass --data-dir pointing at the folder "
                f"that holds {folder_name}/, use --download (needs internet), or copy the "
                f"extracted {archive} into {root.resolve()}"
            )
        batch = _str_keys(safe_unpickle(path), path)
        data, lab = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
            raise DeepLSPError(f"{path}: 'data' is not a uint8 N x 3072 array")
        if data.shape[1] != 3 * 32 * 32 or lab is None or len(lab) != len(data):
            raise DeepLSPError(
                f"{path}: expected N x 3072 data and N {label_key!r}, got {data.shape} "
                f"and {None if lab is None else len(lab)} labels"
            )
        datas.append(data)
        labels.append(np.asarray(lab, dtype=np.int64))
    label_arr = np.concatenate(labels)
    if label_arr.size and (label_arr.min() < 0 or label_arr.max() >= entry.num_classes):
        raise DeepLSPError(f"{folder}: labels outside 0..{entry.num_classes - 1}")
    # Rows are the R, G and B planes one after the other, each 32x32 row-major.
    images = torch.from_numpy(np.concatenate(datas).reshape(-1, 3, 32, 32).copy())
    classes = [str(i) for i in range(entry.num_classes)]
    meta_path = folder / meta_file
    if meta_path.is_file():
        names = _str_keys(safe_unpickle(meta_path), meta_path).get(names_key)
        if isinstance(names, list) and len(names) == entry.num_classes:
            classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    return images, torch.from_numpy(label_arr), classes


# --------------------------------------------------------------------------- Fashion-MNIST

_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # labels, images (uint8 payload)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Parse an IDX file (gzipped or not) of uint8 with `ndim` dims, validating it fully.

    A corrupt or truncated download should fail here, naming the file, rather than
    train on garbage later.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DeepLSPError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DeepLSPError(f"corrupt IDX file {path}: only {len(raw)} bytes")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != _IDX_MAGIC[ndim]:
        raise DeepLSPError(
            f"corrupt IDX file {path}: magic 0x{magic:08x}, expected 0x{_IDX_MAGIC[ndim]:08x}"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DeepLSPError(
            f"corrupt IDX file {path}: dims {dims} need {expected} bytes, file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _download_fashion(data_dir: str | Path | None) -> Path:
    root = Path(data_dir).expanduser() if data_dir is not None else Path("data")
    try:
        tvd.FashionMNIST(root=str(root), download=True)
    except Exception as exc:
        raise DeepLSPError(
            f"fashionmnist: download to {root} failed ({type(exc).__name__}: {exc})"
        ) from None
    return root / "FashionMNIST" / "raw"


def _load_fashion(
    entry: DatasetEntry, split: str, data_dir: str | Path | None, download: bool
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    img_stem, lab_stem = _FASHION_FILES[split]
    candidates = _fashion_candidates(data_dir)
    found = next(
        (
            (_find_idx(d, img_stem), _find_idx(d, lab_stem))
            for d in candidates
            if _find_idx(d, img_stem) and _find_idx(d, lab_stem)
        ),
        None,
    )
    if found is None and download:
        raw_dir = _download_fashion(data_dir)
        candidates.append(raw_dir)
        img, lab = _find_idx(raw_dir, img_stem), _find_idx(raw_dir, lab_stem)
        found = (img, lab) if img and lab else None
    if found is None:
        searched = ", ".join(str(d.resolve()) for d in candidates)
        raise DeepLSPError(
            f"fashionmnist: no {img_stem}[.gz] + {lab_stem}[.gz] in {searched}; pass --data-dir "
            f"to the folder holding them, install them ({entry.default_dir_hint}), "
            "or use --download (needs internet)"
        )
    img_path, lab_path = found
    assert img_path is not None and lab_path is not None
    images, labels = read_idx(img_path, 3), read_idx(lab_path, 1)
    if images.shape[1:] != (28, 28):
        raise DeepLSPError(f"corrupt IDX file {img_path}: images are {images.shape[1:]}, not 28x28")
    if len(images) != len(labels):
        raise DeepLSPError(
            f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels"
        )
    if labels.size and labels.max() >= entry.num_classes:
        raise DeepLSPError(f"corrupt IDX file {lab_path}: label {labels.max()} > 9")
    return (
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        list(FASHION_CLASSES),
    )


# --------------------------------------------------------------------------- ImageNet


class _WnidFolder(ImageFolder):
    """ImageFolder with a fixed class list, so labels do not depend on which folders exist."""

    def __init__(self, root: str, wnids: list[str], transform: Any) -> None:
        self._wnids = wnids
        super().__init__(root, transform=transform, allow_empty=True)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return list(self._wnids), {w: i for i, w in enumerate(self._wnids)}


def _imagenet_folder(entry: DatasetEntry, split: str, root: Path, transform: Any) -> Dataset:
    folder = root / ("train" if split == "train" else "val")
    layout = f"expected {root.resolve()}/{{train,val}}/<wnid>/<image>.JPEG"
    if not folder.is_dir():
        raise DeepLSPError(
            f"imagenet: missing {folder.resolve()}; {layout} "
            "(pass --data-dir; ImageNet cannot be downloaded automatically)"
        )
    # Class indices come from train/ when it exists (sorted WordNet ids, as torchvision's
    # ImageNet does), so a val/ holding only some classes still gets matching labels.
    index_dir = root / "train" if (root / "train").is_dir() else folder
    wnids = sorted(p.name for p in index_dir.iterdir() if p.is_dir())
    if not wnids:
        raise DeepLSPError(f"imagenet: no class folders in {index_dir.resolve()}; {layout}")
    extra = sorted({p.name for p in folder.iterdir() if p.is_dir()} - set(wnids))
    if extra:
        raise DeepLSPError(f"imagenet: {folder} has classes not in {index_dir}: {extra[:5]}")
    try:
        ds = _WnidFolder(str(folder), wnids, transform=transform)
    except (OSError, ValueError) as exc:
        raise DeepLSPError(f"imagenet: cannot read {folder}: {exc}") from None
    if len(ds) == 0:
        raise DeepLSPError(f"imagenet: no images in {folder.resolve()}; {layout}")
    return ds


# --------------------------------------------------------------------------- public API


def load_split(
    name: str,
    split: str,
    data_dir: str | Path | None = None,
    *,
    train_augment: bool | None = None,
    subset: int | None = None,
    seed: int = 0,
    download: bool = False,
) -> Dataset:
    """One split of a dataset as `(float32 CHW normalised image, int label)` samples.

    `train_augment` defaults to `split == "train"`. `subset` keeps a fixed, seeded random
    sample of that many items (the whole split if it has fewer), for quick runs.
    Fashion-MNIST's 28x28 images are zero-padded by 2 to 32x32 so every model, VGG16
    included, sees the same 32x32 input as on CIFAR.
    """
    entry = get_dataset(name)
    if split not in SPLITS:
        raise DeepLSPError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)}")
    if subset is not None and subset <= 0:
        raise DeepLSPError(f"subset must be a positive number of samples, got {subset}")
    augment = split == "train" if train_augment is None else train_augment
    transform = _build_transform(entry, augment)

    dataset: Dataset
    if name in _CIFAR_LAYOUT:
        root = resolve_data_dir(name, data_dir)
        images, labels, classes = _load_cifar(entry, split, root, download)
        dataset = TensorImageDataset(images, labels, transform, classes)
    elif name == "fashionmnist":
        images, labels, classes = _load_fashion(entry, split, data_dir, download)
        dataset = TensorImageDataset(images, labels, transform, classes)
    elif name == "imagenet":
        root = resolve_data_dir(name, data_dir)
        if download:
            raise DeepLSPError(
                "imagenet cannot be downloaded automatically; get ILSVRC2012 from "
                f"https://image-net.org and lay it out as {entry.default_dir_hint}"
            )
        dataset = _imagenet_folder(entry, split, root, transform)
    else:  # pragma: no cover - every registered entry is handled above
        raise DeepLSPError(f"no loader for dataset {name!r}")

    n = len(dataset)  # type: ignore[arg-type]
    if subset is None or subset >= n:
        return dataset
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randperm(n, generator=gen)[:subset].sort().values.tolist()
    return Subset(dataset, indices)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader whose shuffle order (and worker seeds) depend only on `seed`."""
    if batch_size < 1:
        raise DeepLSPError(f"batch size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise DeepLSPError(f"num_workers must be >= 0, got {num_workers}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )


def calibration_batches(
    name: str,
    data_dir: str | Path | None = None,
    n_batches: int = 4,
    batch_size: int = 32,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Real training (images, labels) batches (eval transforms, no augmentation) for
    sensitivity analysis.

    The same arguments always give the same images, so pruning decisions are reproducible.
    If the split is smaller than `n_batches * batch_size`, fewer/shorter batches come back.
    """
    if n_batches < 1:
        raise DeepLSPError(f"n_batches must be at least 1, got {n_batches}")
    if batch_size < 1:
        raise DeepLSPError(f"batch size must be at least 1, got {batch_size}")
    ds = load_split(
        name, "train", data_dir, train_augment=False, subset=n_batches * batch_size, seed=seed
    )
    loader = make_loader(ds, batch_size, shuffle=False, seed=seed)
    return [(images, labels) for images, labels in loader]
