"""Datasets and data loaders.

``DATASET.TYPE`` picks the data:

* ``cifar100`` -- torchvision's ``cifar-100-python/`` layout under ``DATASET.ROOT``
  (default ``./data``); extracted from ``cifar-100-python.tar.gz`` or downloaded when
  ``DATASET.DOWNLOAD`` is on. mdistiller's transforms. 100 classes.
* ``fashion_mnist`` -- IDX files under ``DATASET.ROOT`` (default the Debian package's
  ``/usr/share/datasets/fashion-mnist``; ``embedded`` = the subset shipped in
  ``data/assets/fashion_mnist_mini``), padded to 3 x 32 x 32. 10 classes.
* ``imagenet`` -- ImageFolder ``<root>/train`` and ``<root>/val`` (default root
  ``./data/imagenet``), crops of ``DATASET.IMAGE_SIZE``.
* ``synthetic`` -- a generated, learnable set sized by ``DATASET.SYNTHETIC.*``.
* ``glue`` -- a GLUE task (``DATASET.GLUE.TASK``) in GLUE's own layout under
  ``DATASET.ROOT`` (default ``./data/glue_data``); the dev file is the test set.
* ``tsv`` -- a folder of ``train.tsv`` / ``dev.tsv`` (optionally ``test.tsv``, then
  ``dev.tsv`` is the validation split) with columns ``sentence`` (``sentence2``) ``label``.

Text items are ``((sentence[, sentence2]), label)``, tokenised per batch by
:class:`.text.TextCollator` (see :mod:`.text`).

``DATASET.TRAIN_SUBSET`` / ``DATASET.TEST_SUBSET`` > 0 keep that many items, a fixed
class-balanced choice (seed 0, independent of ``EXPERIMENT.SEED``).

``DATASET.VAL_SPLIT`` > 0 holds that many *training* items out as a validation split:
a fixed class-balanced choice (seed :data:`VAL_SEED`, independent of
``EXPERIMENT.SEED``, so every method and seed sees the same split), read with the test
transform (no augmentation). It is taken out first; ``TRAIN_SUBSET`` then chooses from
the rest, so no validation item is ever trained on. Choose options and defaults on the
validation split; keep the test set for final numbers.

Public API: :func:`get_dataloaders`, :func:`get_loaders`, :func:`build_splits`,
:func:`build_datasets`, :func:`dataset_description`.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import ConfigError
from . import cifar100, fashion_mnist, imagenet, synthetic, text
from .common import ArrayImageDataset, LabelledSubset, PrivateRNGDataset, ShardSampler, balanced_subset_indices

__all__ = [
    "DATASET_TYPES",
    "ShardSampler",
    "balanced_subset_indices",
    "Splits",
    "VAL_SEED",
    "build_datasets",
    "build_splits",
    "dataset_description",
    "get_dataloaders",
    "get_loaders",
    "Loaders",
]

#: Seed of the validation split's class-balanced choice (``DATASET.VAL_SPLIT``).
VAL_SEED = 1

_BUILDERS = {
    "cifar100": cifar100.build,
    "fashion_mnist": fashion_mnist.build,
    "imagenet": imagenet.build,
    "synthetic": synthetic.build,
    "glue": text.build_glue,
    "tsv": text.build_tsv,
}
#: The valid values of ``DATASET.TYPE``.
DATASET_TYPES = tuple(_BUILDERS)

#: Added to the augmentation generator's seed so its stream differs from the loader generator's.
_AUGMENT_SEED_OFFSET = 1 << 20

# cfg.DATASET dump -> description of the last build with it (strings only, no data kept)
_DESCRIPTIONS: dict[str, str] = {}


def _dataset_type(cfg) -> str:
    kind = str(cfg.DATASET.TYPE).strip().lower()
    if kind not in _BUILDERS:
        raise ConfigError(f"DATASET.TYPE is '{cfg.DATASET.TYPE}'; use one of {', '.join(DATASET_TYPES)}")
    return kind


def _subset(dataset, n: int):
    if n <= 0 or n >= len(dataset):
        return dataset
    idx = balanced_subset_indices(dataset.targets, n)
    if isinstance(dataset, ArrayImageDataset):
        return dataset.select(idx)
    return LabelledSubset(dataset, idx)


def _with_transform(dataset, transform):
    """A shallow copy of ``dataset`` (or of the dataset under a subset view) using ``transform``."""
    if isinstance(dataset, LabelledSubset):
        return LabelledSubset(_with_transform(dataset.dataset, transform), dataset.indices)
    if not hasattr(dataset, "transform"):
        return dataset  # tensors without augmentation (synthetic)
    out = copy.copy(dataset)
    out.transform = transform
    return out


def _hold_out(train, test, n: int):
    """Split ``train`` into ``(rest, val)``: ``val`` holds ``n`` class-balanced items with ``test``'s transform."""
    val_idx = balanced_subset_indices(train.targets, n, seed=VAL_SEED)
    taken = set(val_idx)
    rest_idx = [i for i in range(len(train)) if i not in taken]
    eval_view = _with_transform(train, getattr(test, "transform", None))
    if isinstance(train, ArrayImageDataset):
        return train.select(rest_idx), eval_view.select(val_idx)
    return LabelledSubset(train, rest_idx), LabelledSubset(eval_view, val_idx)


def _size_note(name: str, full: int, kept: int, requested: int) -> str:
    if requested <= 0:
        return f"{name} {full}"
    if requested >= full:
        return f"{name} {full} ({name.upper()}_SUBSET {requested} >= set size: all kept)"
    return f"{name} {kept} of {full} (class-balanced subset)"


class Splits(NamedTuple):
    """The datasets of a config: ``val`` is ``None`` unless ``DATASET.VAL_SPLIT`` > 0."""

    train: object
    val: Optional[object]
    test: object
    num_classes: int


def build_splits(cfg) -> Splits:
    """Return the :class:`Splits` (train, validation, test, number of classes) of ``cfg.DATASET``.

    Items are ``(image tensor, int label)`` (text: ``(texts, int label)``); every set has a
    ``targets`` list. A builder may return the validation split itself (``tsv`` with
    ``test.tsv``), else ``DATASET.VAL_SPLIT`` holds training items out.
    Missing or malformed data raises :class:`~mdistiller_blockkd.errors.DatasetError`,
    a bad ``DATASET.*`` value :class:`~mdistiller_blockkd.errors.ConfigError`.
    """
    kind = _dataset_type(cfg)
    n_train, n_test = int(cfg.DATASET.TRAIN_SUBSET), int(cfg.DATASET.TEST_SUBSET)
    n_val = int(cfg.DATASET.VAL_SPLIT)
    if n_train < 0 or n_test < 0:
        raise ConfigError(
            f"DATASET.TRAIN_SUBSET is {n_train} and DATASET.TEST_SUBSET is {n_test}; use 0 (whole set) or a positive count"
        )
    if n_val < 0:
        raise ConfigError(f"DATASET.VAL_SPLIT is {n_val}; use 0 (no validation split) or a positive count")
    built = _BUILDERS[kind](cfg)
    train, test, num_classes, root = built[:4]
    full_train, full_test = len(train), len(test)
    val, val_note = None, ""
    if len(built) > 4:  # the data bring their own validation split (tsv with test.tsv: dev.tsv)
        val = built[4]
        val_note = f"val {len(val)} (the set's own validation split), "
    elif n_val:
        if n_val > full_train // 2:
            raise ConfigError(
                f"DATASET.VAL_SPLIT is {n_val} but the training set has {full_train} items; hold out at most half "
                f"({full_train // 2})"
            )
        train, val = _hold_out(train, test, n_val)
        val_note = f"val {len(val)} (held out of train), "
    rest = len(train)
    train, test = _subset(train, n_train), _subset(test, n_test)
    _DESCRIPTIONS[cfg.DATASET.dump()] = (
        f"{kind} from {root}: {_size_note('train', rest, len(train), n_train)}, {val_note}"
        f"{_size_note('test', full_test, len(test), n_test)}, {num_classes} classes"
    )
    return Splits(train, val, test, num_classes)


def build_datasets(cfg):
    """Return ``(train_set, test_set, num_classes)`` for ``cfg.DATASET`` (see :func:`build_splits`)."""
    s = build_splits(cfg)
    return s.train, s.test, s.num_classes


def dataset_description(cfg) -> str:
    """One line for logs: dataset type, where it was read from, sizes, number of classes.

    Uses the record of the last :func:`build_datasets` with the same ``cfg.DATASET``;
    builds the datasets if there is none.
    """
    key = cfg.DATASET.dump()
    if key not in _DESCRIPTIONS:
        build_datasets(cfg)
    return _DESCRIPTIONS[key]


class Loaders(NamedTuple):
    """The loaders of a config: ``val`` is ``None`` unless ``DATASET.VAL_SPLIT`` > 0."""

    train: DataLoader
    val: Optional[DataLoader]
    test: DataLoader
    num_classes: int


def get_dataloaders(cfg, rank: int = 0, world_size: int = 1):
    """Return ``(train_loader, test_loader, num_classes)``; see :func:`get_loaders`."""
    loaders = get_loaders(cfg, rank, world_size)
    return loaders.train, loaders.test, loaders.num_classes


def get_loaders(cfg, rank: int = 0, world_size: int = 1, collate_fn=None) -> Loaders:
    """Return the :class:`Loaders` (train, validation, test) for process ``rank`` of ``world_size``.

    Train: batches of ``SOLVER.BATCH_SIZE`` (per process) drawn by a
    ``DistributedSampler(shuffle=True, seed=EXPERIMENT.SEED)`` -- also for one process,
    so the order depends only on the seed and the epoch; call
    ``train_loader.sampler.set_epoch(epoch)`` each epoch. ``drop_last=True``.
    Test: batches of ``DATASET.TEST.BATCH_SIZE`` in order; rank ``r`` takes items
    ``r, r + W, ...`` (no padding, no duplicates), so summed metrics are exact.

    Augmentation differs per rank and resumes exactly. With ``DATASET.NUM_WORKERS 0`` the
    training set is a :class:`PrivateRNGDataset` drawing from its own generator, seeded
    from ``EXPERIMENT.SEED`` and ``rank`` (``train_loader.dataset.augment_generator``;
    the trainer saves it with each rank's RNG state). Worker processes
    (``DATASET.NUM_WORKERS > 0``) are started afresh every epoch (not persistent): their
    seeds derive from the loader's generator, seeded from ``EXPERIMENT.SEED`` and
    ``rank`` and saved by the trainer too. Memory is pinned only when CUDA is available. The validation split
    (``DATASET.VAL_SPLIT``), if any, is loaded like the test set. ``collate_fn`` (every loader's)
    batches the items: text data need one (:class:`.text.TextCollator`, built with the
    models' tokenizer by the assembler).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    workers = int(cfg.DATASET.NUM_WORKERS)
    if workers < 0:
        raise ConfigError(f"DATASET.NUM_WORKERS is {workers}; use 0 (load in the main process) or more")
    batch, test_batch = int(cfg.SOLVER.BATCH_SIZE), int(cfg.DATASET.TEST.BATCH_SIZE)
    if test_batch < 1:
        raise ConfigError(f"DATASET.TEST.BATCH_SIZE is {test_batch}; use 1 or more")
    train_set, val_set, test_set, num_classes = build_splits(cfg)
    per_rank = math.ceil(len(train_set) / world_size)
    if per_rank < batch:
        raise ConfigError(
            f"the training set has {len(train_set)} items ({per_rank} per process) but SOLVER.BATCH_SIZE is {batch} "
            "and incomplete batches are dropped; lower SOLVER.BATCH_SIZE or use more data (DATASET.TRAIN_SUBSET)"
        )
    seed = int(cfg.EXPERIMENT.SEED)
    if workers == 0:  # augmentation in this process: its own generator, distinct per rank (not the global RNG)
        train_set = PrivateRNGDataset(train_set, torch.Generator().manual_seed(seed * 1000 + rank + _AUGMENT_SEED_OFFSET))
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), collate_fn=collate_fn)
    train_sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    train_loader = DataLoader(
        train_set,
        batch_size=batch,
        sampler=train_sampler,
        drop_last=True,
        # seeds the workers' augmentation RNG: reproducible for a given seed, distinct per rank
        generator=torch.Generator().manual_seed(seed * 1000 + rank),
        # fresh workers each epoch: their RNG derives from the saved generator, so resume is exact
        persistent_workers=False,
        **common,
    )
    val_loader = None if val_set is None else _eval_loader(val_set, test_batch, rank, world_size, common)
    return Loaders(train_loader, val_loader, _eval_loader(test_set, test_batch, rank, world_size, common), num_classes)


def _eval_loader(dataset, batch: int, rank: int, world_size: int, common: dict) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, sampler=ShardSampler(len(dataset), rank, world_size),
                      shuffle=False, drop_last=False, **common)
