"""Building blocks shared by every dataset type.

* :class:`ArrayImageDataset` -- images held as one uint8 array, labels as a list;
  the CIFAR-100 and Fashion-MNIST readers produce it.
* :class:`LabelledSubset` -- a subset view that keeps a ``targets`` list.
* :func:`balanced_subset_indices` -- the fixed, class-balanced choice used by
  ``DATASET.TRAIN_SUBSET`` / ``DATASET.TEST_SUBSET`` and by the embedded
  Fashion-MNIST subset.
* :class:`ShardSampler` -- evaluation sharding without padding or duplicates.
* :class:`GrayToRGB` -- a picklable transform that repeats a 1-channel tensor 3 times.
* :class:`PrivateRNGDataset` -- draws a dataset's random augmentation from its own
  generator (distinct per DDP rank when the data loads in the main process).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

#: Seed of the class-balanced subset choice; independent of ``EXPERIMENT.SEED`` so a
#: subset is the same images whatever the experiment seed.
SUBSET_SEED = 0


class PrivateRNGDataset(Dataset):
    """``dataset`` whose items are produced with ``generator`` as torch's CPU random source.

    ``__getitem__`` swaps ``generator``'s state in for torch's global CPU RNG state while
    the wrapped dataset loads the item (torchvision's random crops and flips draw from
    it), then stores the advanced state back in ``generator`` and restores the global
    state. Augmentation then depends on ``generator`` alone: seed it per rank and every
    DDP rank draws its own crops and flips, while model initialisation and the
    distillers' draws (global RNG) stay identical on every rank. Save and restore
    ``generator`` with the run's RNG states and a resumed run draws the same augmentation.
    Meant for loading in the main process (``num_workers=0``); worker processes get their
    own seeds from the loader. Python's ``random`` and numpy are not redirected.
    """

    def __init__(self, dataset, generator: torch.Generator):
        self.dataset = dataset
        self.augment_generator = generator
        self.targets = getattr(dataset, "targets", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        saved = torch.get_rng_state()
        torch.set_rng_state(self.augment_generator.get_state())
        try:
            return self.dataset[index]
        finally:
            self.augment_generator.set_state(torch.get_rng_state())
            torch.set_rng_state(saved)


class ArrayImageDataset(Dataset):
    """Images in a uint8 array ``(N, H, W)`` (grey) or ``(N, H, W, 3)`` (RGB).

    ``__getitem__`` returns ``(transform(PIL image), int label)``. ``targets`` is the
    list of labels, ``classes`` the class names (may be empty).
    """

    def __init__(self, images: np.ndarray, targets, transform=None, classes=()):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be a uint8 (N,H,W) or (N,H,W,3) array, got {images.dtype} {images.shape}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels")
        self.images = np.ascontiguousarray(images)
        self.targets = [int(t) for t in targets]
        self.transform = transform
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    def select(self, indices) -> "ArrayImageDataset":
        """Return a new dataset holding only ``indices`` (copies just those images)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayImageDataset(self.images[idx], [self.targets[i] for i in idx], self.transform, self.classes)


class LabelledSubset(Dataset):
    """``torch.utils.data.Subset`` that also exposes ``targets`` and ``classes``."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        base = list(dataset.targets)
        self.targets = [int(base[i]) for i in self.indices]
        self.classes = list(getattr(dataset, "classes", []))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def balanced_subset_indices(labels, n: int, seed: int = SUBSET_SEED) -> list[int]:
    """Pick ``n`` indices spread as evenly as possible over the classes in ``labels``.

    Each class's indices are shuffled with ``numpy.random.default_rng(seed)``; the pick
    then takes one index per class in turn (classes in ascending label order), so
    every class gets ``n // C`` or ``n // C + 1`` items (a class that runs out leaves
    its share to the others). The result is sorted. ``n >= len(labels)`` keeps all.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if n >= len(labels):
        return list(range(len(labels)))
    if n <= 0:
        return []
    rng = np.random.default_rng(seed)
    pools = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        pools.append(list(rng.permutation(members)))
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        for pool in pools:
            if depth < len(pool):
                picked.append(int(pool[depth]))
                if len(picked) == n:
                    break
        depth += 1
    return sorted(picked)


class ShardSampler(Sampler):
    """Rank ``r`` of ``W`` yields ``r, r + W, r + 2W, ...`` in order.

    Unlike ``DistributedSampler`` nothing is padded or repeated, so per-rank sums of
    correct predictions and sample counts add up to exact whole-set metrics. With
    ``world_size == 1`` it is a sequential sampler.
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.length = int(length)
        self.rank = int(rank)
        self.world_size = int(world_size)

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return max(0, math.ceil((self.length - self.rank) / self.world_size))


class GrayToRGB:
    """Repeat a ``(1, H, W)`` tensor to ``(3, H, W)`` (so RGB models run unchanged)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[0] != 1:
            raise ValueError(f"GrayToRGB expects a (1, H, W) tensor, got {tuple(x.shape)}")
        return x.repeat(3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
