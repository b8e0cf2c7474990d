"""ImageNet (or any ImageFolder-style set) from ``<root>/train/<class>/*`` and ``<root>/val/<class>/*``."""

from __future__ import annotations

import os

import torchvision.transforms as T
from torchvision.datasets import ImageFolder

from ..errors import ConfigError, DatasetError

DEFAULT_ROOT = "./data/imagenet"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

_LAYOUT = (
    "expected layout: <root>/train/<class_name>/<image files> and <root>/val/<class_name>/<image files> "
    "with the same class folders in both (the validation images sorted into class folders); "
    "set DATASET.ROOT to <root> (default ./data/imagenet)"
)


def train_transform(size: int):
    """RandomResizedCrop(size), horizontal flip, tensor, ImageNet normalisation."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def test_transform(size: int):
    """Resize the short side to int(size / 0.875), centre crop ``size``, tensor, normalise."""
    return T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])


def resolve_root(cfg) -> str:
    """``DATASET.ROOT`` or ``./data/imagenet``, absolute."""
    return os.path.abspath(os.path.expanduser(cfg.DATASET.ROOT or DEFAULT_ROOT))


def _folder(path: str, transform) -> ImageFolder:
    if not os.path.isdir(path):
        raise DatasetError(f"ImageNet folder '{path}' not found; {_LAYOUT}")
    try:
        return ImageFolder(path, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / a class without images
        raise DatasetError(f"ImageNet folder '{path}' is unusable ({e}); {_LAYOUT}") from None


def build(cfg):
    """Return ``(train_set, val_set, num_classes, root)`` for ``DATASET.TYPE imagenet``."""
    size = int(cfg.DATASET.IMAGE_SIZE)
    if size < 1:
        raise ConfigError(f"DATASET.IMAGE_SIZE is {cfg.DATASET.IMAGE_SIZE}; use a positive crop size such as 224")
    root = resolve_root(cfg)
    train = _folder(os.path.join(root, "train"), train_transform(size))
    val = _folder(os.path.join(root, "val"), test_transform(size))
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise DatasetError(
            f"'{root}/train' has {len(train.classes)} class folders and '{root}/val' has {len(val.classes)}; "
            f"they must match (only in train: {only_train}, only in val: {only_val}); {_LAYOUT}"
        )
    return train, val, len(train.classes), root
