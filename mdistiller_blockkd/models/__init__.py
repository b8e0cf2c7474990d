"""Model zoo and registry.

``build_model(name, num_classes=100)`` builds any registered CIFAR model by its
mdistiller name (``resnet56``, ``wrn_40_2``, ``ShuffleV1``, ...) or any timm CNN as
``"timm:<name>"``. Every model is a :class:`~.staged.StagedModel`.

``model_dict`` maps each CIFAR name to ``(constructor, default teacher checkpoint path)``
like mdistiller's ``cifar_model_dict``.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, Optional, Tuple

from ..errors import ConfigError
from .staged import StagedModel, StagedView, StageInfo, count_params  # noqa: F401

#: Where mdistiller keeps its CIFAR-100 teachers (relative to the working directory).
CIFAR_TEACHER_DIR = os.path.join("download_ckpts", "cifar_teachers")

model_dict: Dict[str, Tuple[Callable[..., StagedModel], Optional[str]]] = {}

_FAMILIES = ("resnet", "resnetv2", "wrn", "vgg", "mobilenetv2", "shufflenetv1", "shufflenetv2")


def register_model(name: str, teacher_ckpt: bool = True):
    """Decorator: register ``ctor(num_classes=100, **kw)`` under ``name``."""

    def deco(fn):
        path = os.path.join(CIFAR_TEACHER_DIR, f"{name}_vanilla", "ckpt_epoch_240.pth") if teacher_ckpt else None
        model_dict[name] = (fn, path)
        return fn

    return deco


def _load_families():
    for fam in _FAMILIES:
        importlib.import_module(f"{__name__}.cifar.{fam}")


def list_models():
    _load_families()
    return sorted(model_dict)


def build_model(name: str, num_classes: int = 100, pretrained=False, **kwargs) -> StagedModel:
    """Build a model by name. ``timm:<name>`` wraps a timm backbone (see ``timm_backbone``).

    ``pretrained`` only applies to timm models: ``True`` uses timm's own weight loading,
    a path loads a local checkpoint.
    """
    if name.startswith("timm:"):
        from .timm_backbone import build_timm_model

        return build_timm_model(name[len("timm:"):], num_classes=num_classes, pretrained=pretrained, **kwargs)
    _load_families()
    if name not in model_dict:
        raise ConfigError(
            f"unknown model '{name}'. Known CIFAR models: {', '.join(sorted(model_dict))}; "
            "or use 'timm:<timm model name>'"
        )
    if pretrained:
        raise ConfigError(
            f"model '{name}' has no pretrained weights; set DISTILLER.TEACHER_CKPT to a checkpoint file instead"
        )
    return model_dict[name][0](num_classes=num_classes, **kwargs)


def default_teacher_ckpt(name: str) -> Optional[str]:
    _load_families()
    entry = model_dict.get(name)
    return entry[1] if entry else None
