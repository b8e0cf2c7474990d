"""A small generated image set for tests and smoke runs (``DATASET.TYPE synthetic``).

Every class has a smooth random template: a 3 x 4 x 4 Gaussian grid bilinearly
upsampled to S x S and scaled to unit standard deviation. An image is its class's
template plus independent Gaussian noise of standard deviation ``NOISE``, so classes
are separable by a small convolutional net within a couple of epochs but not
trivially (the noise is as strong as the signal per pixel). Everything comes from
fixed seeds, independent of ``EXPERIMENT.SEED``: the same config gives the same
tensors on every run and every process. Images are already zero-mean, unit-scale
float tensors; no augmentation is applied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import ConfigError

SEED = 20240607  # fixed; deliberately not EXPERIMENT.SEED
NOISE = 1.0
GRID = 4


class SyntheticImages(Dataset):
    """Pre-generated ``(3, S, S)`` float images with integer labels ``targets``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
        self.images = images
        self.targets = [int(v) for v in labels]
        self.classes = [f"class_{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


def _templates(num_classes: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    grid = torch.randn(num_classes, 3, GRID, GRID, generator=g)
    t = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    t = t - t.mean(dim=(1, 2, 3), keepdim=True)
    return t / t.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def _split(templates: torch.Tensor, n: int, stream: int) -> SyntheticImages:
    num_classes, _, size, _ = templates.shape
    g = torch.Generator().manual_seed(SEED + stream)
    labels = torch.arange(n) % num_classes  # balanced
    labels = labels[torch.randperm(n, generator=g)]
    images = templates[labels] + NOISE * torch.randn(n, 3, size, size, generator=g)
    return SyntheticImages(images.contiguous(), labels, num_classes)


def build(cfg):
    """Return ``(train_set, test_set, num_classes, "<generated>")`` from ``DATASET.SYNTHETIC.*``."""
    syn = cfg.DATASET.SYNTHETIC
    c, n_train, n_test, size = int(syn.NUM_CLASSES), int(syn.TRAIN_SIZE), int(syn.TEST_SIZE), int(syn.IMAGE_SIZE)
    if c < 2:
        raise ConfigError(f"DATASET.SYNTHETIC.NUM_CLASSES is {c}; use 2 or more")
    if n_train < c or n_test < 1:
        raise ConfigError(
            f"DATASET.SYNTHETIC.TRAIN_SIZE is {n_train} and TEST_SIZE is {n_test}; "
            f"use TRAIN_SIZE >= NUM_CLASSES ({c}) and TEST_SIZE >= 1"
        )
    if size < 8:
        raise ConfigError(f"DATASET.SYNTHETIC.IMAGE_SIZE is {size}; use 8 or more (32 for the CIFAR models)")
    templates = _templates(c, size)
    return _split(templates, n_train, 1), _split(templates, n_test, 2), c, "<generated>"
