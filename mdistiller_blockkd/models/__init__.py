"""Model zoo.

``build_model(name, num_classes=100)`` builds any registered model by its mdistiller name
(``resnet56``, ``wrn_40_2``, ``ShuffleV1``, ...), any timm CNN or ViT as ``"timm:<name>"``
and any local Hugging Face BERT-family encoder as ``"hf:<folder>"``; ``timm:`` and ``hf:``
names may carry options after commas (``timm:deit_tiny_patch16_224,img_size=32,patch_size=8``,
see :mod:`.spec`). Every model is a :class:`~.staged.StagedModel`.

The CIFAR families (``models/cifar/``, one file each) enter the registry
:data:`mdistiller_blockkd.registry.MODELS` with the ``@register_model`` decorator when
they are imported here; an outside package adds a model the same way.
``model_dict`` is that registry: name -> ``(constructor, default teacher checkpoint
path)``, like mdistiller's ``cifar_model_dict``.
"""

from __future__ import annotations

from typing import List, Optional

from ..errors import ConfigError
from ..registry import CIFAR_TEACHER_DIR, MODELS, load_plugins, register_model  # noqa: F401 - part of this API
from .cifar import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn  # noqa: F401 - they register
from .staged import StagedModel, StagedView, StageInfo, count_params  # noqa: F401

#: mdistiller's name for the model registry.
model_dict = MODELS


def list_models() -> List[str]:
    """Sorted names of the registered models, plugins' included (``timm:<name>`` models are not listed)."""
    load_plugins()
    return sorted(MODELS)


def build_model(name: str, num_classes: int = 100, pretrained=False, **kwargs) -> StagedModel:
    """Build a model by name. ``timm:<name>`` wraps a timm backbone (see ``timm_backbone``),
    ``hf:<folder>`` a local Hugging Face encoder (see ``hf_encoder``).

    ``pretrained`` only applies to timm models: ``True`` uses timm's own weight loading,
    a path loads a local checkpoint. An unknown name raises
    :class:`~mdistiller_blockkd.errors.ConfigError` listing the known ones.
    """
    if name.startswith("timm:"):
        from .spec import split_model_spec
        from .timm_backbone import build_timm_model

        base, options = split_model_spec(name)
        clash = sorted(set(options) & set(kwargs))
        if clash:
            raise ConfigError(f"model '{name}': option(s) {', '.join(clash)} given both in the name and as arguments")
        return build_timm_model(base[len("timm:"):], num_classes=num_classes, pretrained=pretrained,
                                **options, **kwargs)
    if name.startswith("hf:"):
        from .hf_encoder import build_hf_model

        return build_hf_model(name, num_classes=num_classes, pretrained=pretrained, **kwargs)
    if name not in MODELS:
        load_plugins()  # outside packages' models (entry points), imported on first need
    if name not in MODELS:
        raise ConfigError(
            f"unknown model '{name}'. Known CIFAR models: {', '.join(sorted(MODELS))}; "
            "or use 'timm:<timm model name>' or 'hf:<folder of a Hugging Face model>'"
        )
    if pretrained:
        raise ConfigError(
            f"model '{name}' has no pretrained weights; set DISTILLER.TEACHER_CKPT to a checkpoint file instead"
        )
    return MODELS[name][0](num_classes=num_classes, **kwargs)


def default_teacher_ckpt(name: str) -> Optional[str]:
    """mdistiller's default teacher checkpoint path of model ``name`` (``None`` if it has none)."""
    entry = MODELS.get(name)
    return entry[1] if entry else None
