"""torchvision Faster R-CNN detectors with ResNet-FPN backbones, built offline.

Names: ``fasterrcnn_<resnet>_fpn`` with ``<resnet>`` one of torchvision's ResNets
(``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``resnet152``). The model is
torchvision's own :class:`~torchvision.models.detection.FasterRCNN` over a
:class:`BackboneWithFPN` built as ``resnet_fpn_backbone`` builds it (:func:`resnet_fpn`; the FPN width is
``DETECTION.FPN_CHANNELS``, torchvision's 256 by default), so its state-dict keys are
torchvision's (``backbone.body.layer1...``, ``backbone.fpn...``, ``rpn...``,
``roi_heads...``): ``fasterrcnn_resnet50_fpn``'s COCO weights load into
``build_detector("fasterrcnn_resnet50_fpn", 91, ...)`` unchanged, and an exported student
loads into torchvision's model of the same shape.

No weights are downloaded (``weights=None``, ``weights_backbone=None``); a teacher's
weights come from a local file (:func:`load_detector_weights`).

Staged view
    ``backbone.body`` is an ``IntermediateLayerGetter`` over ``conv1, bn1, relu, maxpool,
    layer1..layer4`` returning ``{"0": layer1, ..., "3": layer4}``; :func:`stage_channels`
    gives each stage's width (64/128/256/512 for BasicBlock ResNets, 4x for
    Bottleneck ones) at strides 4, 8, 16, 32. Block-KD splices these stages
    (:mod:`.distillers`).
"""

from __future__ import annotations

import os
from typing import Dict, List

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import misc as misc_ops

from ..errors import CheckpointError, ConfigError
from ..utils.checkpoint import extract_state_dict, load_checkpoint

__all__ = ["DETECTOR_RESNETS", "build_detector", "detector_backbone_name", "stage_channels",
           "body_stages", "load_detector_weights", "missing_teacher_error", "TORCHVISION_WEIGHT_FILES"]

DETECTOR_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
STAGES = ("layer1", "layer2", "layer3", "layer4")

#: torchvision's file names of its COCO detection weights (``~/.cache/torch/hub/checkpoints/``).
TORCHVISION_WEIGHT_FILES = {
    "fasterrcnn_resnet50_fpn": "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth",
}


def detector_backbone_name(name: str) -> str:
    """``fasterrcnn_resnet34_fpn`` -> ``resnet34``; an unknown name raises :class:`ConfigError`."""
    n = str(name).strip()
    if n.startswith("fasterrcnn_") and n.endswith("_fpn") and n[len("fasterrcnn_"):-len("_fpn")] in DETECTOR_RESNETS:
        return n[len("fasterrcnn_"):-len("_fpn")]
    valid = ", ".join(f"fasterrcnn_{r}_fpn" for r in DETECTOR_RESNETS)
    raise ConfigError(f"detection model '{name}' is unknown; use one of {valid}")


def _norm_layer(kind: str):
    kind = str(kind).lower()
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "frozen_bn":
        return misc_ops.FrozenBatchNorm2d
    raise ConfigError(f"DETECTION norm is '{kind}'; use bn (trained BatchNorm) or frozen_bn (torchvision's default)")


def build_detector(name: str, num_classes: int, dcfg, norm: str = "bn") -> FasterRCNN:
    """torchvision ``FasterRCNN`` named ``name`` with ``num_classes`` (background included) classes.

    ``dcfg`` is ``cfg.DETECTION``: ``MIN_SIZE``, ``MAX_SIZE`` (the transform's resize),
    ``IMAGE_MEAN``/``IMAGE_STD``, ``TRAINABLE_LAYERS``, RPN and box-head sizes (see
    :mod:`mdistiller_blockkd.detection.cfg`). ``norm``: ``bn`` (BatchNorm, for training
    from scratch) or ``frozen_bn`` (torchvision's choice with pretrained backbones; also
    what a teacher uses: it loads weights trained with either). Weights are random.
    """
    arch = detector_backbone_name(name)
    if int(num_classes) < 2:
        raise ConfigError(f"a detector needs at least 2 classes (background + 1), got {num_classes}")
    backbone = resnet_fpn(arch, _norm_layer(norm), int(dcfg.TRAINABLE_LAYERS), int(dcfg.FPN_CHANNELS))
    rep = int(dcfg.REPRESENTATION_SIZE)
    res = 7
    box_head = TwoMLPHead(backbone.out_channels * res * res, rep)
    model = FasterRCNN(
        backbone,
        num_classes=None,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(rep, int(num_classes)),
        min_size=int(dcfg.MIN_SIZE),
        max_size=int(dcfg.MAX_SIZE),
        image_mean=list(dcfg.IMAGE_MEAN),
        image_std=list(dcfg.IMAGE_STD),
        rpn_pre_nms_top_n_train=int(dcfg.RPN_PRE_NMS_TOP_N_TRAIN),
        rpn_pre_nms_top_n_test=int(dcfg.RPN_PRE_NMS_TOP_N_TEST),
        rpn_post_nms_top_n_train=int(dcfg.RPN_POST_NMS_TOP_N_TRAIN),
        rpn_post_nms_top_n_test=int(dcfg.RPN_POST_NMS_TOP_N_TEST),
        rpn_batch_size_per_image=int(dcfg.RPN_BATCH_SIZE_PER_IMAGE),
        box_batch_size_per_image=int(dcfg.BOX_BATCH_SIZE_PER_IMAGE),
        box_detections_per_img=int(dcfg.DETECTIONS_PER_IMAGE),
        box_score_thresh=float(dcfg.BOX_SCORE_THRESH),
    )
    model.num_classes = int(num_classes)
    model.arch_name = str(name)
    return model


def resnet_fpn(arch: str, norm_layer, trainable_layers: int = 5, out_channels: int = 256) -> BackboneWithFPN:
    """torchvision's ``resnet_fpn_backbone`` with a choice of FPN width (its own is fixed at 256).

    Same modules and state-dict keys (``body.*``, ``fpn.*``); layers outside the
    ``trainable_layers`` last ones (of ``layer4, layer3, layer2, layer1, conv1``) are frozen
    as torchvision does.
    """
    if not 0 <= trainable_layers <= 5:
        raise ConfigError(f"DETECTION.TRAINABLE_LAYERS is {trainable_layers}; use 0..5")
    if out_channels < 1:
        raise ConfigError(f"DETECTION.FPN_CHANNELS is {out_channels}; use a positive width (torchvision: 256)")
    body = getattr(tv_resnet, arch)(weights=None, norm_layer=norm_layer)
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for name, p in body.named_parameters():
        if not any(name.startswith(t) for t in train):
            p.requires_grad_(False)
    c2 = body.inplanes // 8
    return BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, [c2 * 2 ** i for i in range(4)],
                           out_channels, extra_blocks=LastLevelMaxPool())


def body_stages(model: FasterRCNN) -> List[nn.Module]:
    """``[layer1, layer2, layer3, layer4]`` of the detector's backbone body."""
    body = model.backbone.body
    return [body[s] for s in STAGES]


def stage_channels(model: FasterRCNN) -> List[int]:
    """Output channels of ``layer1..layer4``."""
    out = []
    for stage in body_stages(model):
        last = stage[-1]
        bn = getattr(last, "bn3", None) or last.bn2
        out.append(int(bn.weight.shape[0]))
    return out


def body_stem(model: FasterRCNN, x: torch.Tensor) -> torch.Tensor:
    """``conv1 -> bn1 -> relu -> maxpool`` of the backbone body."""
    body = model.backbone.body
    return body.maxpool(body.relu(body.bn1(body.conv1(x))))


def missing_teacher_error(path: str, name: str) -> CheckpointError:
    """The error for a missing teacher file: names the path, torchvision's file name and the alternatives."""
    hint = ""
    if name in TORCHVISION_WEIGHT_FILES:
        hint = (f" torchvision's COCO weights of '{name}' are the file '{TORCHVISION_WEIGHT_FILES[name]}' "
                f"(download it where the network allows, e.g. with torchvision.models.detection.{name}"
                "(weights='DEFAULT'), which stores it under ~/.cache/torch/hub/checkpoints/) and copy it here;")
    return CheckpointError(
        f"detection teacher checkpoint '{path}' (DISTILLER.TEACHER_CKPT) for '{name}' not found;{hint} or train a "
        f"teacher with DISTILLER.TYPE NONE, DISTILLER.STUDENT {name} and set DISTILLER.TEACHER_CKPT to its "
        "student_best")


def load_detector_weights(model: FasterRCNN, path: str, name: str, num_classes: int) -> None:
    """Load a detector's weights from the local file ``path`` (``torch.load(weights_only=True)``).

    Accepts torchvision's own files (a bare state dict) and this toolbox's ``{"model": sd}``
    files (``student_best`` of a detection run); torchvision's old RPN-head key names
    (``rpn.head.conv.weight``) are renamed as torchvision does. ``num_batches_tracked`` entries are
    ignored (a ``frozen_bn`` teacher loads BatchNorm-trained weights). Raises
    :class:`CheckpointError`: missing file (naming torchvision's file name for its COCO
    weights), or weights of another architecture; :class:`ConfigError` when the file's
    classifier has another number of classes than the data.
    """
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise missing_teacher_error(path, name)
    sd = extract_state_dict(load_checkpoint(path), path, prefix="student.")
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    for kind in ("weight", "bias"):  # torchvision's older files (the COCO weights): RPNHead v1 key names
        if f"rpn.head.conv.{kind}" in sd:
            sd[f"rpn.head.conv.0.0.{kind}"] = sd.pop(f"rpn.head.conv.{kind}")
    key = "roi_heads.box_predictor.cls_score.weight"
    if key in sd and int(sd[key].shape[0]) != int(num_classes):
        raise ConfigError(
            f"teacher checkpoint '{path}' classifies {int(sd[key].shape[0])} classes (background included) but the "
            f"dataset has {num_classes} (its categories + background); use a teacher trained on this dataset's "
            "categories (for COCO: the 80 categories of instances_*2017.json, torchvision's 91-slot head maps them "
            "through DETECTION.CATEGORY_IDS_AS_LABELS True)")
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        ex = "; ".join((missing[:2] + unexpected[:2] + shapes[:2])[:3])
        raise CheckpointError(
            f"checkpoint '{path}' does not fit detector '{name}' ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(shapes)} mis-shaped tensors, e.g. {ex}); is it a checkpoint of another backbone or "
            "DETECTION.REPRESENTATION_SIZE?")
    model.load_state_dict(sd, strict=False)
