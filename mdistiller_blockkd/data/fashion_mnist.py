"""Fashion-MNIST from IDX files (plain or gzipped), padded to 32x32 and repeated to 3 channels.

Files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each optionally with ``.gz``. ``DATASET.ROOT``:

* ``""`` -- ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``);
* ``"embedded"`` -- the class-balanced subset shipped in ``data/assets/fashion_mnist_mini/``
  (written by ``python -m mdistiller_blockkd make-fmnist-subset``);
* any other folder holding the four files.

IDX format: a 4-byte magic (two zero bytes, a type code, the number of dimensions),
one big-endian uint32 per dimension, then the values in C order.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np
import torchvision.transforms as T

from ..utils.fileio import atomic_write
from ..errors import DatasetError
from .common import ArrayImageDataset, GrayToRGB

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
EMBEDDED = "embedded"
EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "fashion_mnist_mini")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
NUM_CLASSES = 10
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Mean and std of all pixels (scaled to [0, 1]) of the 60000 original 28x28 training images,
# computed once with numpy from /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz:
# mean 0.28604, std 0.35302 (over the 2-px zero-padded 32x32 images it would be 0.2190 / 0.3318).
# The same value is used for the 3 repeated channels.
MEAN = (0.2860,) * 3
STD = (0.3530,) * 3
PAD = 2  # 28x28 -> 32x32

# IDX type code -> numpy dtype (big-endian where multi-byte)
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(v).newbyteorder(">"): k for k, v in _IDX_TYPES.items()}


def parse_idx(blob: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into an array; a bad magic or a size mismatch raises DatasetError naming ``name``."""
    if len(blob) < 4:
        raise DatasetError(f"IDX file '{name}' is corrupt: only {len(blob)} bytes, no header")
    zero0, zero1, code, ndim = blob[0], blob[1], blob[2], blob[3]
    if zero0 or zero1 or code not in _IDX_TYPES or ndim == 0:
        raise DatasetError(f"IDX file '{name}' is corrupt: bad magic number 0x{blob[:4].hex()} (expected 0x0000TTDD)")
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise DatasetError(f"IDX file '{name}' is corrupt: header truncated ({len(blob)} bytes)")
    dims = struct.unpack(f">{ndim}I", blob[4:header])
    dtype = np.dtype(_IDX_TYPES[code])
    want = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(blob) - header
    if got != want:
        raise DatasetError(
            f"IDX file '{name}' is corrupt: header says shape {tuple(dims)} ({want} bytes of data) "
            f"but the file holds {got} bytes after the header"
        )
    return np.frombuffer(blob, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file; ``.gz`` files are decompressed. Errors name ``path``."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                blob = f.read()
        else:
            with open(path, "rb") as f:
                blob = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DatasetError(f"IDX file '{path}' is corrupt: gzip error ({e}); replace it with a good copy") from None
    except OSError as e:
        raise DatasetError(f"cannot read IDX file '{path}': {e}") from None
    return parse_idx(blob, path)


def encode_idx(array: np.ndarray) -> bytes:
    """Encode ``array`` as IDX bytes (inverse of :func:`parse_idx`)."""
    array = np.asarray(array)
    key = array.dtype.newbyteorder(">")
    if key not in _IDX_CODES:
        raise ValueError(f"dtype {array.dtype} has no IDX type code")
    header = bytes([0, 0, _IDX_CODES[key], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=key).tobytes()


def write_idx(path: str, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file atomically; ``.gz`` paths are gzipped reproducibly (mtime 0)."""
    blob = encode_idx(array)

    def write(raw) -> None:
        if path.endswith(".gz"):
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
                gz.write(blob)
        else:
            raw.write(blob)

    atomic_write(path, write, binary=True)


def find_file(root: str, base: str) -> str | None:
    """``<root>/<base>`` if present, else ``<root>/<base>.gz`` if present, else None."""
    for name in (base, base + ".gz"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


def resolve_root(cfg) -> str:
    """The folder the IDX files are read from (handles ``""`` and ``"embedded"``)."""
    root = str(cfg.DATASET.ROOT).strip()
    if not root:
        return DEFAULT_ROOT
    if root.lower() == EMBEDDED:
        return EMBEDDED_DIR
    return os.path.abspath(os.path.expanduser(root))


def load_split(root: str, split: str):
    """Return ``(images uint8 (N, 28, 28), labels list[int])`` of ``split`` ("train" / "test")."""
    paths = []
    for base in FILES[split]:
        path = find_file(root, base)
        if path is None:
            raise DatasetError(
                f"Fashion-MNIST not found: '{os.path.join(root, base)}' (or '{base}.gz') is missing. "
                "Install it with `apt-get install dataset-fashion-mnist`, or set DATASET.ROOT to a folder with "
                "the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                "t10k-labels-idx1-ubyte, plain or .gz), or set DATASET.ROOT embedded for the shipped subset"
            )
        paths.append(path)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetError(f"IDX file '{paths[0]}' holds {images.dtype} {images.shape}; expected uint8 (N, 28, 28) images")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(f"IDX file '{paths[1]}' holds {labels.dtype} {labels.shape}; expected uint8 (N,) labels")
    if len(images) != len(labels):
        raise DatasetError(f"'{paths[0]}' has {len(images)} images but '{paths[1]}' has {len(labels)} labels")
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise DatasetError(f"IDX file '{paths[1]}' has label {int(labels.max())}; Fashion-MNIST labels are 0..9")
    return images, labels.tolist()


def train_transform():
    """Random 32x32 crop of the 4-px padded image, horizontal flip, tensor, 3 channels, normalise."""
    return T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), GrayToRGB(), T.Normalize(MEAN, STD)]
    )


def test_transform():
    """Tensor, 3 channels, normalise."""
    return T.Compose([T.ToTensor(), GrayToRGB(), T.Normalize(MEAN, STD)])


def _pad(images: np.ndarray) -> np.ndarray:
    return np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)), mode="constant", constant_values=0)


def build(cfg):
    """Return ``(train_set, test_set, 10, root)`` for ``DATASET.TYPE fashion_mnist``."""
    root = resolve_root(cfg)
    tr_x, tr_y = load_split(root, "train")
    te_x, te_y = load_split(root, "test")
    train = ArrayImageDataset(_pad(tr_x), tr_y, transform=train_transform(), classes=CLASSES)
    test = ArrayImageDataset(_pad(te_x), te_y, transform=test_transform(), classes=CLASSES)
    return train, test, NUM_CLASSES, root
