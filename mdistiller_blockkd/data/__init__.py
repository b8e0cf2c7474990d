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

``DATASET.TRAIN_SUBSET`` / ``DATASET.TEST_SUBSET`` > 0 keep that many items, a fixed
class-balanced choice (seed 0, independent of ``EXPERIMENT.SEED``).

Public API: :func:`get_dataloaders`, :func:`build_datasets`, :func:`dataset_description`.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import ConfigError
from . import cifar100, fashion_mnist, imagenet, synthetic
from .common import ArrayImageDataset, LabelledSubset, PrivateRNGDataset, ShardSampler, balanced_subset_indices

__all__ = [
    "DATASET_TYPES",
    "ShardSampler",
    "balanced_subset_indices",
    "build_datasets",
    "dataset_description",
    "get_dataloaders",
]

_BUILDERS = {
    "cifar100": cifar100.build,
    "fashion_mnist": fashion_mnist.build,
    "imagenet": imagenet.build,
    "synthetic": synthetic.build,
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


def _size_note(name: str, full: int, kept: int, requested: int) -> str:
    if requested <= 0:
        return f"{name} {full}"
    if requested >= full:
        return f"{name} {full} ({name.upper()}_SUBSET {requested} >= set size: all kept)"
    return f"{name} {kept} of {full} (class-balanced subset)"


def build_datasets(cfg):
    """Return ``(train_set, val_set, num_classes)`` for ``cfg.DATASET``.

    Items are ``(image tensor, int label)``; both sets have a ``targets`` list.
    Missing or malformed data raises :class:`~mdistiller_blockkd.errors.DatasetError`,
    a bad ``DATASET.*`` value :class:`~mdistiller_blockkd.errors.ConfigError`.
    """
    kind = _dataset_type(cfg)
    n_train, n_test = int(cfg.DATASET.TRAIN_SUBSET), int(cfg.DATASET.TEST_SUBSET)
    if n_train < 0 or n_test < 0:
        raise ConfigError(
            f"DATASET.TRAIN_SUBSET is {n_train} and DATASET.TEST_SUBSET is {n_test}; use 0 (whole set) or a positive count"
        )
    train, val, num_classes, root = _BUILDERS[kind](cfg)
    full_train, full_val = len(train), len(val)
    train, val = _subset(train, n_train), _subset(val, n_test)
    _DESCRIPTIONS[cfg.DATASET.dump()] = (
        f"{kind} from {root}: {_size_note('train', full_train, len(train), n_train)}, "
        f"{_size_note('test', full_val, len(val), n_test)}, {num_classes} classes"
    )
    return train, val, num_classes


def dataset_description(cfg) -> str:
    """One line for logs: dataset type, where it was read from, sizes, number of classes.

    Uses the record of the last :func:`build_datasets` with the same ``cfg.DATASET``;
    builds the datasets if there is none.
    """
    key = cfg.DATASET.dump()
    if key not in _DESCRIPTIONS:
        build_datasets(cfg)
    return _DESCRIPTIONS[key]


def get_dataloaders(cfg, rank: int = 0, world_size: int = 1):
    """Return ``(train_loader, val_loader, num_classes)`` for process ``rank`` of ``world_size``.

    Train: batches of ``SOLVER.BATCH_SIZE`` (per process) drawn by a
    ``DistributedSampler(shuffle=True, seed=EXPERIMENT.SEED)`` -- also for one process,
    so the order depends only on the seed and the epoch; call
    ``train_loader.sampler.set_epoch(epoch)`` each epoch. ``drop_last=True``.
    Val: batches of ``DATASET.TEST.BATCH_SIZE`` in order; rank ``r`` takes items
    ``r, r + W, ...`` (no padding, no duplicates), so summed metrics are exact.

    Augmentation differs per rank and resumes exactly. With ``DATASET.NUM_WORKERS 0`` the
    training set is a :class:`PrivateRNGDataset` drawing from its own generator, seeded
    from ``EXPERIMENT.SEED`` and ``rank`` (``train_loader.dataset.augment_generator``;
    the trainer saves it with each rank's RNG state). Worker processes
    (``DATASET.NUM_WORKERS > 0``) are started afresh every epoch (not persistent): their
    seeds derive from the loader's generator, seeded from ``EXPERIMENT.SEED`` and
    ``rank`` and saved by the trainer too. Memory is pinned only when CUDA is available.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    workers = int(cfg.DATASET.NUM_WORKERS)
    if workers < 0:
        raise ConfigError(f"DATASET.NUM_WORKERS is {workers}; use 0 (load in the main process) or more")
    batch, test_batch = int(cfg.SOLVER.BATCH_SIZE), int(cfg.DATASET.TEST.BATCH_SIZE)
    if test_batch < 1:
        raise ConfigError(f"DATASET.TEST.BATCH_SIZE is {test_batch}; use 1 or more")
    train_set, val_set, num_classes = build_datasets(cfg)
    per_rank = math.ceil(len(train_set) / world_size)
    if per_rank < batch:
        raise ConfigError(
            f"the training set has {len(train_set)} items ({per_rank} per process) but SOLVER.BATCH_SIZE is {batch} "
            "and incomplete batches are dropped; lower SOLVER.BATCH_SIZE or use more data (DATASET.TRAIN_SUBSET)"
        )
    seed = int(cfg.EXPERIMENT.SEED)
    if workers == 0:  # augmentation in this process: its own generator, distinct per rank (not the global RNG)
        train_set = PrivateRNGDataset(train_set, torch.Generator().manual_seed(seed * 1000 + rank + _AUGMENT_SEED_OFFSET))
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available())
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
    val_loader = DataLoader(
        val_set,
        batch_size=test_batch,
        sampler=ShardSampler(len(val_set), rank, world_size),
        shuffle=False,
        drop_last=False,
        **common,
    )
    return train_loader, val_loader, num_classes
