"""CIFAR-100 from torchvision's on-disk layout, read without torchvision's dataset class.

Layout: ``<root>/cifar-100-python/{train,test}``, each a python pickle of a dict with
``b"data"`` (uint8 array ``(N, 3072)``, channel-major 3x32x32 rows) and
``b"fine_labels"`` (N ints in 0..99). The pickles are read with a restricted unpickler
that accepts only the numpy types an array needs, so a tampered file cannot run code.

When the folder is missing: an archive ``<root>/cifar-100-python.tar.gz`` is
extracted; otherwise, with ``DATASET.DOWNLOAD``, the official archive is downloaded
(md5-checked); otherwise :class:`~mdistiller_blockkd.errors.DatasetError` says where
to put the data.
"""

from __future__ import annotations

import importlib
import os
import pickle
import shutil
import tarfile
import tempfile

import numpy as np
import torchvision.transforms as T

from ..errors import DatasetError
from .common import ArrayImageDataset

FOLDER = "cifar-100-python"
ARCHIVE = "cifar-100-python.tar.gz"
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
DEFAULT_ROOT = "./data"
NUM_CLASSES = 100
MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)


def train_transform():
    """mdistiller's CIFAR-100 training transform."""
    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def test_transform():
    """mdistiller's CIFAR-100 test transform."""
    return T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])


# (module, name) pairs an ndarray pickle needs; numpy.core.* is numpy 1.x's spelling;
# _codecs.encode is how Python 3 writes bytes at pickle protocol 2 (a re-saved file).
_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR-100 file")
        if module.startswith("numpy.core."):
            try:  # numpy >= 2 moved numpy.core to numpy._core (the old name warns)
                return getattr(importlib.import_module("numpy._core." + module[len("numpy.core."):]), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def read_split(path: str):
    """Return ``(images uint8 (N, 32, 32, 3), labels list[int])`` from one CIFAR-100 pickle."""
    try:
        with open(path, "rb") as f:
            entry = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DatasetError(f"cannot read CIFAR-100 file '{path}': {e}") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise DatasetError(
            f"CIFAR-100 file '{path}' is corrupt or not a CIFAR-100 pickle ({type(e).__name__}: {e}); "
            f"delete the '{FOLDER}' folder and extract {ARCHIVE} again"
        ) from None
    if not isinstance(entry, dict) or b"data" not in entry or b"fine_labels" not in entry:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise DatasetError(f"CIFAR-100 file '{path}' lacks b'data' / b'fine_labels' (found {keys}); is it CIFAR-10?")
    data = np.asarray(entry[b"data"])
    labels = [int(v) for v in entry[b"fine_labels"]]
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DatasetError(
            f"CIFAR-100 file '{path}' is malformed: data {data.dtype} {data.shape}, {len(labels)} labels "
            "(expected uint8 (N, 3072) and N labels)"
        )
    if labels and not (0 <= min(labels) and max(labels) < NUM_CLASSES):
        raise DatasetError(f"CIFAR-100 file '{path}' has labels outside 0..99 ({min(labels)}..{max(labels)})")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _read_class_names(folder: str):
    path = os.path.join(folder, "meta")
    if not os.path.isfile(path):
        return []
    try:
        with open(path, "rb") as f:
            meta = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"fine_label_names"]]
    except Exception:  # noqa: BLE001 - class names are optional
        return []


def _safe_extract(archive: str, dest: str) -> None:
    with tarfile.open(archive, "r:*") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
            return
        for m in tar.getmembers():  # older Pythons: refuse paths that leave dest, and links
            if m.name.startswith(("/", "\\")) or ".." in m.name.replace("\\", "/").split("/") or not (m.isfile() or m.isdir()):
                raise DatasetError(f"archive '{archive}' holds an unsafe entry '{m.name}'")
        tar.extractall(dest)


def _install_folder(tmp: str, root: str) -> None:
    """Move ``tmp/cifar-100-python`` into ``root`` atomically (another process may win)."""
    src = os.path.join(tmp, FOLDER)
    if not os.path.isdir(src):
        raise DatasetError(f"the archive does not contain a '{FOLDER}/' folder")
    try:
        os.replace(src, os.path.join(root, FOLDER))
    except OSError:
        if not os.path.isdir(os.path.join(root, FOLDER)):
            raise


def _extract_local(root: str) -> None:
    archive = os.path.join(root, ARCHIVE)
    tmp = tempfile.mkdtemp(prefix=".cifar100-extract-", dir=root)
    try:
        _safe_extract(archive, tmp)
        _install_folder(tmp, root)
    except (tarfile.TarError, EOFError, OSError, DatasetError) as e:
        raise DatasetError(
            f"cannot extract '{archive}' ({e}); delete it and place a complete copy of {ARCHIVE} "
            f"(md5 {MD5}) or its extracted '{FOLDER}/' folder in '{root}'"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(root: str) -> None:
    from torchvision.datasets import utils as tv_utils  # looked up at call time (tests patch it)

    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".cifar100-download-", dir=root)
    try:
        tv_utils.download_and_extract_archive(URL, download_root=tmp, filename=ARCHIVE, md5=MD5)
        _install_folder(tmp, root)
        if not os.path.exists(os.path.join(root, ARCHIVE)):
            os.replace(os.path.join(tmp, ARCHIVE), os.path.join(root, ARCHIVE))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_root(cfg) -> str:
    """The CIFAR-100 root of ``cfg`` (``DATASET.ROOT`` or ``./data``), absolute."""
    return os.path.abspath(os.path.expanduser(cfg.DATASET.ROOT or DEFAULT_ROOT))


def ensure_available(root: str, download: bool) -> str:
    """Make ``<root>/cifar-100-python/{train,test}`` exist (extract / download) and return the folder."""
    folder = os.path.join(root, FOLDER)
    wanted = [os.path.join(folder, s) for s in ("train", "test")]
    if all(os.path.isfile(p) for p in wanted):
        return folder
    if os.path.isfile(os.path.join(root, ARCHIVE)):
        _extract_local(root)
        if all(os.path.isfile(p) for p in wanted):
            return folder
        raise DatasetError(f"extracted '{os.path.join(root, ARCHIVE)}' but '{wanted[0]}' / '{wanted[1]}' are still missing")
    if download:
        try:
            _download(root)
        except Exception as e:  # noqa: BLE001 - offline, proxy, md5 mismatch, disk full ...
            why = f"download from {URL} failed ({type(e).__name__}: {e})"
        else:
            if all(os.path.isfile(p) for p in wanted):
                return folder
            why = f"download from {URL} did not produce {FOLDER}/train and {FOLDER}/test"
    else:
        why = "DATASET.DOWNLOAD is False"
    raise DatasetError(
        f"CIFAR-100 not found: looked for '{wanted[0]}' and '{wanted[1]}' ({why}). "
        f"Place {ARCHIVE} (or its extracted '{FOLDER}/' folder) in '{root}', "
        "or set DATASET.ROOT to the folder that holds it"
    )


def build(cfg):
    """Return ``(train_set, test_set, 100, root)`` for ``DATASET.TYPE cifar100``."""
    root = resolve_root(cfg)
    folder = ensure_available(root, bool(cfg.DATASET.DOWNLOAD))
    classes = _read_class_names(folder)
    train = ArrayImageDataset(*read_split(os.path.join(folder, "train")), transform=train_transform(), classes=classes)
    test = ArrayImageDataset(*read_split(os.path.join(folder, "test")), transform=test_transform(), classes=classes)
    return train, test, NUM_CLASSES, root
