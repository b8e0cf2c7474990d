"""The assembler: builds what a config describes -- data, student, teacher (with its weights), distiller.

It stands above the models, the data and the distillers (it is the only module that
reads both ``DATASET.*`` and ``DISTILLER.*``) and below the trainer and the commands.

* :func:`assemble` -- the data loaders and the distiller of a run (what the train command uses);
* :func:`build_distiller` -- student, teacher and the ``DISTILLER.TYPE`` method;
* :func:`make_distiller` -- the method around a given student and teacher;
* :func:`input_size` -- the side of the dataset's images, which the distillers receive;
* :func:`check_distiller_config` -- fail fast before data is read (text data: :func:`check_text_models`);
* :func:`text_collator` -- the text loaders' batching, with the teacher's tokenizer;
* :func:`teacher_checkpoint_path` -- where the teacher's weights are read from.

Distillers and models of outside packages are found through the registries
(:mod:`mdistiller_blockkd.registry`): entry points are loaded here.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..config import shipped_config
from ..data import get_loaders
from ..data.text import TEXT_TYPES, TextCollator
from ..distillers import distiller_dict
from ..errors import CheckpointError, ConfigError
from ..models import build_model, default_teacher_ckpt, list_models
from ..registry import load_plugins
from ..utils.checkpoint import load_model_weights

__all__ = ["assemble", "build_distiller", "make_distiller", "input_size", "check_distiller_config", "teacher_checkpoint_path",
           "distiller_type", "is_text", "check_text_models", "text_collator"]


def distiller_type(cfg) -> str:
    """``cfg.DISTILLER.TYPE`` upper-cased; an unregistered type raises :class:`ConfigError` listing the valid ones."""
    load_plugins()
    kind = str(cfg.DISTILLER.TYPE).strip().upper()
    if kind not in distiller_dict:
        raise ConfigError(
            f"unknown DISTILLER.TYPE '{cfg.DISTILLER.TYPE}'; valid types: {', '.join(sorted(distiller_dict))}"
        )
    return kind


def input_size(cfg) -> int:
    """Side of the (square) images the models see: ``DATASET.IMAGE_SIZE`` for ImageNet,
    ``DATASET.SYNTHETIC.IMAGE_SIZE`` for the synthetic set, 32 for CIFAR-100 and padded Fashion-MNIST."""
    kind = str(cfg.DATASET.TYPE).strip().lower()
    if kind == "imagenet":
        return int(cfg.DATASET.IMAGE_SIZE)
    if kind == "synthetic":
        return int(cfg.DATASET.SYNTHETIC.IMAGE_SIZE)
    return 32


def _vanilla_config(name: str) -> Optional[str]:
    """Short name of the shipped CIFAR-100 vanilla config of ``name`` (``None`` if there is none)."""
    short = f"cifar100/vanilla/{name}"
    return short if shipped_config(short) else None


def teacher_checkpoint_path(cfg) -> Optional[str]:
    """Path of the teacher's weights: ``DISTILLER.TEACHER_CKPT`` or the model's default.

    ``None`` when nothing is to be loaded (timm's pretrained weights:
    ``TEACHER_PRETRAINED`` true and no ``TEACHER_CKPT``). A teacher with neither a
    default path nor ``TEACHER_CKPT`` raises :class:`ConfigError`.
    """
    name = cfg.DISTILLER.TEACHER
    if cfg.DISTILLER.TEACHER_CKPT:
        return os.path.expanduser(str(cfg.DISTILLER.TEACHER_CKPT))
    if cfg.DISTILLER.TEACHER_PRETRAINED:
        return None
    path = default_teacher_ckpt(name)
    if path is None:
        raise ConfigError(
            f"teacher '{name}' has no default checkpoint path; set DISTILLER.TEACHER_CKPT to its weights file"
            + (" or DISTILLER.TEACHER_PRETRAINED True for timm's weights" if name.startswith("timm:") else "")
        )
    return path


def _check_teacher_file(cfg, path: str) -> None:
    if os.path.isfile(path):
        return
    name = cfg.DISTILLER.TEACHER
    vanilla = _vanilla_config(name) if str(cfg.DATASET.TYPE) == "cifar100" else None
    run = (f"a vanilla run ('mdistiller-blockkd-train --cfg {vanilla}')" if vanilla
           else f"a vanilla run (DISTILLER.TYPE NONE, DISTILLER.STUDENT {name})")
    if cfg.DISTILLER.TEACHER_CKPT:
        raise CheckpointError(
            f"teacher checkpoint '{path}' (DISTILLER.TEACHER_CKPT) not found; set DISTILLER.TEACHER_CKPT to an "
            f"existing weights file of '{name}', e.g. the student_best written by {run}"
        )
    how = (f"train it with 'mdistiller-blockkd-train --cfg {vanilla}' (writes that file)" if vanilla
           else f"train it with {run} and set DISTILLER.TEACHER_CKPT to its student_best")
    raise CheckpointError(
        f"teacher checkpoint '{path}' for '{name}' not found (relative to {os.getcwd()}); {how}, copy mdistiller's "
        "teacher there, or set DISTILLER.TEACHER_CKPT to a weights file"
    )


def is_text(cfg) -> bool:
    """True for text data (``DATASET.TYPE glue`` / ``tsv``)."""
    return str(cfg.DATASET.TYPE).strip().lower() in TEXT_TYPES


def _model_names(cfg, kind: str):
    return [("DISTILLER.STUDENT", str(cfg.DISTILLER.STUDENT))] + (
        [("DISTILLER.TEACHER", str(cfg.DISTILLER.TEACHER))] if kind != "NONE" else [])


def check_text_models(cfg, kind: Optional[str] = None) -> None:
    """Text data need ``hf:`` models and ``hf:`` models need text data; a student must share the
    teacher's vocabulary and ``DATASET.TEXT.MAX_LENGTH`` must fit every model (reads configs only)."""
    from ..models.hf_encoder import check_max_length, check_student_vocabulary

    kind = distiller_type(cfg) if kind is None else kind
    names = _model_names(cfg, kind)
    if not is_text(cfg):
        for key, name in names:
            if name.startswith("hf:"):
                raise ConfigError(f"{key} is '{name}', a text model, but DATASET.TYPE is '{cfg.DATASET.TYPE}'; hf: "
                                  f"models train on text data: DATASET.TYPE {' or '.join(TEXT_TYPES)} (docs/nlp.md)")
        return
    for key, name in names:
        if not name.startswith("hf:"):
            raise ConfigError(f"DATASET.TYPE {cfg.DATASET.TYPE} is text but {key} is '{name}'; text data need "
                              "hf:<folder> models (local BERT-family encoders, docs/nlp.md)")
        check_max_length(name, int(cfg.DATASET.TEXT.MAX_LENGTH))
    if kind != "NONE":
        check_student_vocabulary(str(cfg.DISTILLER.STUDENT), str(cfg.DISTILLER.TEACHER))


def text_collator(cfg, model: Optional[str] = None) -> TextCollator:
    """The text loaders' ``collate_fn``: the teacher's tokenizer (the student's for ``NONE``; ``model``'s
    when given: the eval command's), at most ``DATASET.TEXT.MAX_LENGTH`` tokens per example."""
    from ..models.hf_encoder import check_max_length, load_tokenizer

    if model is None:
        kind = distiller_type(cfg)
        check_text_models(cfg, kind)
        model = _model_names(cfg, kind)[-1][1]
    elif not str(model).startswith("hf:"):
        raise ConfigError(f"DATASET.TYPE {cfg.DATASET.TYPE} is text but the model is '{model}'; text data need "
                          "hf:<folder> models (local BERT-family encoders, docs/nlp.md)")
    else:
        check_max_length(model, int(cfg.DATASET.TEXT.MAX_LENGTH))
    return TextCollator(load_tokenizer(model), int(cfg.DATASET.TEXT.MAX_LENGTH))


def check_distiller_config(cfg) -> None:
    """Fail fast, before any data is read: the distiller type, the model names and the teacher file.

    Raises what :func:`build_distiller` would raise for these inputs.
    """
    kind = distiller_type(cfg)
    distiller_dict[kind].check_cfg(cfg)
    check_text_models(cfg, kind)
    known = list_models()
    for _, name in _model_names(cfg, kind):
        if not name.startswith(("timm:", "hf:")) and name not in known:
            build_model(name)  # raises the registry's ConfigError naming the model and the known ones
    if kind != "NONE":
        ckpt = teacher_checkpoint_path(cfg)
        if ckpt is not None:
            _check_teacher_file(cfg, ckpt)


def build_distiller(cfg, num_classes: int, device="cpu"):
    """Build ``distiller_dict[DISTILLER.TYPE](student, teacher, cfg, input_size=...)`` on ``device``.

    * the student is ``build_model(DISTILLER.STUDENT, num_classes)`` with fresh weights;
    * the teacher (not for ``NONE``) is ``build_model(DISTILLER.TEACHER, num_classes,
      pretrained=DISTILLER.TEACHER_PRETRAINED)`` whose weights are then read from
      ``DISTILLER.TEACHER_CKPT`` or the model's default path (mdistiller's
      ``download_ckpts/cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth``); with
      ``TEACHER_PRETRAINED`` and no ``TEACHER_CKPT`` timm's weights are used as they are.

    Raises :class:`ConfigError` for an unknown type or model and :class:`CheckpointError`
    for a missing, corrupt or mismatching teacher checkpoint (checked before any model
    is built, so a bad path fails fast).
    """
    kind = distiller_type(cfg)
    teacher = None
    ckpt = None
    if kind != "NONE":
        ckpt = teacher_checkpoint_path(cfg)
        if ckpt is not None:
            _check_teacher_file(cfg, ckpt)
    student = build_model(cfg.DISTILLER.STUDENT, num_classes=num_classes)
    if kind != "NONE":
        name = cfg.DISTILLER.TEACHER
        pretrained = bool(cfg.DISTILLER.TEACHER_PRETRAINED) and ckpt is None
        teacher = build_model(name, num_classes=num_classes, pretrained=pretrained)
        if pretrained:
            native = (getattr(teacher, "pretrained_cfg", None) or {}).get("num_classes")
            if native and int(native) != int(num_classes):
                raise ConfigError(
                    f"DISTILLER.TEACHER_PRETRAINED loads timm's weights of '{name}' for {native} classes but the "
                    f"dataset has {num_classes}: the teacher's classifier would be random; fine-tune a teacher on "
                    "this dataset and set DISTILLER.TEACHER_CKPT"
                )
        if ckpt is not None:
            load_model_weights(teacher, ckpt, name=name)
    distiller = make_distiller(cfg, student, teacher, kind)
    return distiller.to(torch.device(device))


def make_distiller(cfg, student, teacher, kind: Optional[str] = None):
    """``distiller_dict[kind](student, teacher, cfg, input_size=input_size(cfg))``; ``kind`` defaults to ``DISTILLER.TYPE``."""
    kind = distiller_type(cfg) if kind is None else str(kind).upper()
    return distiller_dict.lookup(kind, "DISTILLER.TYPE")(student, teacher, cfg, input_size=input_size(cfg))


def assemble(cfg, rank: int = 0, world_size: int = 1, device="cpu"):
    """The data and the distiller of a run: ``(loaders, distiller)``.

    ``loaders`` is :func:`mdistiller_blockkd.data.get_loaders` for process ``rank`` of
    ``world_size`` (train, validation split, test, number of classes; text batched by
    :func:`text_collator`); ``distiller`` is :func:`build_distiller` for that number of
    classes, on ``device``.
    """
    loaders = get_loaders(cfg, rank, world_size, collate_fn=text_collator(cfg) if is_text(cfg) else None)
    return loaders, build_distiller(cfg, loaders.num_classes, device)
