"""Distillers for torchvision Faster R-CNN: vanilla, KD, DKD and Block-KD on ROI class logits.

Every detection distiller follows the toolbox's distiller contract
(:class:`~mdistiller_blockkd.distillers.base.Distiller`) with detection batches:
``forward_train(image=[3xHxW tensors], target=[{"boxes", "labels", ...}], epoch=)``
returns ``((roi_class_logits, roi_labels), {name: loss})`` and ``forward_test(image)``
returns torchvision's detections (a list of ``{"boxes", "labels", "scores"}`` in the
input images' coordinates).

The student step (all methods)
    The student runs as torchvision's ``FasterRCNN.forward`` does in training, split in
    parts so that the distillers can reuse them: ``transform`` (resize + normalise),
    backbone body (``layer1..layer4``), FPN, RPN (its two losses), ROI sampling
    (``RoIHeads.select_training_samples``: ``BOX_BATCH_SIZE_PER_IMAGE`` proposals per
    image, 25 % positives, each with the label of its matched ground-truth box or 0 for
    background), ``box_roi_pool`` + ``box_head`` + ``box_predictor`` and
    ``fastrcnn_loss``. Loss keys: ``loss_classifier``, ``loss_box_reg``,
    ``loss_objectness``, ``loss_rpn_box_reg`` -- torchvision's.

Which proposals are distilled
    The student's *sampled* proposals (the ones its ROI head is trained on, ground-truth
    boxes included, as torchvision adds them), with their matched labels. The teacher
    does not run its RPN: its backbone and FPN run on the *same transformed images* (the
    student's transform; the teacher's own is unused), then its ``box_roi_pool``,
    ``box_head`` and ``box_predictor`` score those proposals. This is the DKD paper's
    detection setup (its mdistiller code distils the ROI head's class logits on the
    student's sampled proposals); it makes student and teacher logits row-aligned.

KD / DKD
    ``loss_classifier`` is scaled by ``KD.LOSS.CE_WEIGHT`` / ``DKD.CE_WEIGHT`` (set 1.0 in
    detection configs), the other detection losses keep weight 1, and ``loss_kd`` is
    ``KD.LOSS.KD_WEIGHT * KD(z_s, z_t; KD.TEMPERATURE)`` or
    ``warm * DKD(z_s, z_t, roi_labels; DKD.ALPHA, DKD.BETA, DKD.T)`` over the
    ``(num_proposals, num_classes)`` class logits (background is a class).

Block-KD
    Stone ``i`` (``i = 1..4``) = student stem + ``layer1..layer_i`` -> connectors
    ``C_1..C_i`` (1x1 conv + BN from the student's stage width to the teacher's, same
    stride; ``C_k`` is shared by every stone that uses level ``k``) -> teacher
    ``layer_{i+1}..layer4`` -> teacher FPN (on the connected student levels ``1..i`` and
    the teacher levels ``i+1..4``) -> teacher ``box_roi_pool`` / ``box_head`` /
    ``box_predictor`` on the student's sampled proposals. Stone 4 is the whole student
    body through connectors into the teacher's FPN and heads. Its class logits
    ``Y^{N_i}`` enter the loss of :class:`~mdistiller_blockkd.distillers.blockkd.BlockKD`
    unchanged (the same function: ``w_i = 1/2^(n-i)``, ensemble cross term, ``ALPHA``,
    ``BETA``, ``GAMMA``, ``T``, ``WARMUP``, ``LOGIT_LOSS``, ``STONES``), with the ROI labels
    as targets. Its task term contains the student's ROI cross-entropy, so
    ``loss_classifier`` is not added again; ``loss_box_reg`` and the RPN losses are. The
    stones have no box-regression or RPN loss: only class logits are distilled.

Warm-up
    DKD and Block-KD ramp their distillation terms over ``DKD.WARMUP`` /
    ``BLOCKKD.WARMUP`` epochs, or over ``DETECTION.DISTILL_WARMUP_STEPS`` optimiser steps
    when that is > 0 (a step counter saved with the distiller, so resume continues it; kept
    as a Python int, mirrored into the ``num_steps`` buffer that checkpoints hold, so
    reading it never waits for the GPU).

The teacher is frozen (``eval()``, no gradients; FrozenBatchNorm) and excluded from
``get_learnable_parameters`` and checkpoints; the exported student is the plain
torchvision ``FasterRCNN`` (torchvision's state-dict keys).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import List, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import fastrcnn_loss

from ..distillers import losses
from ..distillers.base import Distiller, shared_attribute
from ..distillers.blockkd import Connector
from ..distillers.blockkd_core import BlockKDOptions, StonePlanner, blockkd_loss, stone_pass
from ..distillers.dkd import DKD
from ..distillers.kd import KD
from ..errors import ConfigError
from ..registry import DETECTION_DISTILLERS, register_detection_distiller
from ..models.staged import StageInfo
from .models import body_stages, stage_channels

__all__ = ["DetectionDistiller", "DetVanilla", "DetKD", "DetDKD", "DetBlockKD", "det_distiller_dict"]

_STRIDES = (4, 8, 16, 32)


class DetectionDistiller(Distiller):
    """Base of the detection distillers: the student step, teacher ROI logits, warm-up counter."""

    #: marks detection distillers (the trainer's task is chosen from the config, see :mod:`.task`)
    is_detection = True

    def __init__(self, student, teacher=None, cfg=None):
        super().__init__(student, teacher, cfg)
        self.fold_teacher_bn = False  # torchvision detectors: FrozenBatchNorm teacher, nothing to fold
        self.warmup_steps = int(cfg.DETECTION.DISTILL_WARMUP_STEPS) if cfg is not None else 0
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.int64))  # _steps, as checkpoints hold it
        if teacher is not None:
            ns, nt = int(student.num_classes), int(teacher.num_classes)
            if ns != nt:
                raise ConfigError(f"the teacher detector classifies {nt} classes but the student {ns} (background "
                                  "included); teacher and data must have the same categories")
        # BatchNorm statistics of the teacher are frozen; detection uses FrozenBatchNorm2d there

    #: training steps taken (the warm-up's step count): a Python int, so reading it needs no device sync
    _steps = shared_attribute("det_steps", int, int)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._steps = int(self.num_steps)  # one host read, when a checkpoint is loaded

    # -- contract ---------------------------------------------------------------------
    def forward_test(self, image):
        """torchvision detections of the student for a list of images."""
        return self.student(image)

    def warm(self, epoch, warmup_epochs) -> float:
        """The warm-up factor: by steps when ``DISTILL_WARMUP_STEPS`` > 0, else by epochs."""
        if self.warmup_steps > 0:
            return losses.warmup_factor(self._steps, self.warmup_steps)
        return losses.warmup_factor(epoch, warmup_epochs)

    # -- the student step ---------------------------------------------------------------
    def student_step(self, images: List[Tensor], targets: List[dict]):
        """Run the student as in ``FasterRCNN.forward`` (training); return a namespace.

        Fields: ``images`` (torchvision's ``ImageList``), ``body`` (``layer1..4`` outputs),
        ``proposals`` (sampled, per image), ``labels`` (their labels, concatenated),
        ``logits`` / ``box_regression`` of the ROI head, ``losses`` (torchvision's four).
        """
        m = self.student
        if self.training:
            self._steps += 1
            self.num_steps.fill_(self._steps)  # queued on the device; no host sync
        images_t, targets_t = m.transform(images, targets)
        x = images_t.tensors
        body = m.backbone.body(x)
        feats = m.backbone.fpn(body)
        proposals, rpn_losses = m.rpn(images_t, feats, targets_t)
        rh = m.roi_heads
        proposals, _, labels, regression_targets = rh.select_training_samples(proposals, targets_t)
        logits, box_reg = roi_class_logits(m, feats, proposals, images_t.image_sizes, with_boxes=True)
        loss_cls, loss_box = fastrcnn_loss(logits, box_reg, labels, regression_targets)
        out = {"loss_classifier": loss_cls, "loss_box_reg": loss_box, **rpn_losses}
        return SimpleNamespace(images=images_t, body=list(body.values()), proposals=proposals,
                               labels=torch.cat(labels), logits=logits, losses=out)

    @torch.no_grad()
    def teacher_logits(self, step) -> Tensor:
        """The teacher's ROI class logits for the student's sampled proposals (no autograd)."""
        t = self.teacher
        feats = t.backbone(step.images.tensors)
        return roi_class_logits(t, feats, step.proposals, step.images.image_sizes)

    def logit_distill_step(self, images, targets, distill):
        """Student step + teacher ROI logits; ``loss_classifier`` scaled by ``self.ce_loss_weight`` and
        ``loss_kd = distill(student_step, teacher_logits)`` added to torchvision's losses (KD, DKD)."""
        s = self.student_step(images, targets)
        t_logits = self.teacher_logits(s)
        out = dict(s.losses)
        out["loss_classifier"] = self.ce_loss_weight * out["loss_classifier"]
        out["loss_kd"] = distill(s, t_logits)
        return (s.logits.detach(), s.labels), out

    def forward_train(self, image, target, **kwargs):
        raise NotImplementedError


def roi_class_logits(model, feats, proposals, image_sizes, with_boxes: bool = False):
    """``box_roi_pool`` -> ``box_head`` -> ``box_predictor`` of ``model`` on ``proposals``."""
    rh = model.roi_heads
    z = rh.box_head(rh.box_roi_pool(feats, proposals, image_sizes))
    logits, box_reg = rh.box_predictor(z)
    return (logits, box_reg) if with_boxes else logits


class DetVanilla(DetectionDistiller):
    """``NONE``: torchvision's Faster R-CNN training of the student."""

    def __init__(self, student, teacher=None, cfg=None):
        super().__init__(student, None, cfg)

    def forward_train(self, image, target, **kwargs):
        s = self.student_step(image, target)
        return (s.logits.detach(), s.labels), s.losses


class DetKD(DetectionDistiller, KD):
    """``KD`` on the ROI class logits of the student's sampled proposals (see the module docstring).

    Options and their checks are :class:`~mdistiller_blockkd.distillers.kd.KD`'s (next in the MRO).
    """

    def forward_train(self, image, target, **kwargs):
        return self.logit_distill_step(image, target, lambda s, t: self.kd_loss_weight * losses.kd_loss(
            s.logits, t, self.temperature))


class DetDKD(DetectionDistiller, DKD):
    """``DKD`` on the ROI class logits, with the proposals' labels as the target classes.

    Options and their checks are :class:`~mdistiller_blockkd.distillers.dkd.DKD`'s (next in the MRO).
    """

    def forward_train(self, image, target, **kwargs):
        warm = self.warm(kwargs.get("epoch", math.inf), self.warmup)
        return self.logit_distill_step(image, target, lambda s, t: warm * losses.dkd_loss(
            s.logits, t, s.labels, self.alpha, self.beta, self.temperature))


class DetBlockKD(DetectionDistiller):
    """``BLOCKKD`` for Faster R-CNN: stones through the teacher's remaining stages, FPN and ROI head.

    Composes the Block-KD core (:mod:`mdistiller_blockkd.distillers.blockkd_core`): its
    options, its stone planner and its loss; only the stones are its own.
    """

    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher, cfg)
        if teacher is None:
            raise ConfigError("BLOCKKD needs a teacher (DISTILLER.TEACHER)")
        c = cfg.BLOCKKD
        self.opts = BlockKDOptions.from_node(c)
        if self.opts.pairs:
            raise ConfigError("BLOCKKD.PAIRS is not used for detection: stone i always splices student layer_i "
                              "onto teacher layer_{i+1}; leave BLOCKKD.PAIRS []")
        s_ch, t_ch = stage_channels(student), stage_channels(teacher)
        # one connector per FPN level (every stone feeds the teacher's FPN its connected levels 1..i)
        self.connectors = nn.ModuleList(
            Connector(StageInfo(a, r), StageInfo(b, r), self.opts.connector) for a, b, r in zip(s_ch, t_ch, _STRIDES))
        self.planner = StonePlanner(self.opts, len(_STRIDES))

    stone_ids = property(lambda self: self.planner.stone_ids)
    stone_weights = property(lambda self: self.planner.stone_weights)
    has_unused_parameters = property(lambda self: self.planner.has_unused_parameters)

    def get_extra_state(self):
        return self.planner.state_dict()

    def set_extra_state(self, state):
        self.planner.load_state_dict(state)

    @property
    def num_stones(self) -> int:
        return len(self.stone_ids)

    def stone_logits(self, step, active: Sequence[int]) -> List[Tensor]:
        """ROI class logits of the stones ``active`` (indices into ``stone_ids``) for the step's proposals."""
        if not active:
            return []
        t = self.teacher
        t_layers = body_stages(t)
        levels_of = [self.stone_ids[k] for k in active]  # stone i uses student levels 1..i
        connected = [self.connectors[k](step.body[k]) for k in range(max(levels_of))]

        def stone(*levels):  # student layers 1..i, teacher layers i+1..4, FPN, ROI head
            levels = list(levels)
            h = levels[-1]
            for j in range(len(levels), len(t_layers)):
                h = t_layers[j](h)
                levels.append(h)
            feats = t.backbone.fpn({str(k): v for k, v in enumerate(levels)})
            return roi_class_logits(t, feats, step.proposals, step.images.image_sizes)
        return [stone_pass(stone, *connected[:i], opts=self.opts) for i in levels_of]

    def forward_train(self, image, target, **kwargs):
        epoch = kwargs.get("epoch", math.inf)
        plan = self.planner.plan(self, epoch)
        s = self.student_step(image, target)
        t_logits = self.teacher_logits(s)
        stones = self.stone_logits(s, plan.active)
        out = blockkd_loss(self.opts.loss, s.logits, stones, t_logits, s.labels, plan, self.warm(epoch, self.opts.loss.warmup))
        det = dict(s.losses)
        det.pop("loss_classifier")  # inside loss_ce (Block-KD's task term)
        return (s.logits.detach(), s.labels), {**out, **det}

    def describe(self) -> str:
        """One line per stone."""
        s_ch, t_ch = stage_channels(self.student), stage_channels(self.teacher)
        lines = []
        for i, w in zip(self.stone_ids, self.stone_weights):
            conn = ", ".join(f"{a}->{b}" for a, b in zip(s_ch[:i], t_ch[:i]))
            n = len(s_ch)
            rest = (f"teacher layer{i + 1}..layer{n} + " if i + 1 < n else f"teacher layer{n} + " if i < n
                    else "teacher ")
            lines.append(f"stone{i}: student layer1..layer{i} -> connectors ({conn}) -> {rest}FPN + ROI head, w={w:g}")
        return "\n".join(lines)


for _name, _cls in (("NONE", DetVanilla), ("KD", DetKD), ("DKD", DetDKD), ("BLOCKKD", DetBlockKD)):
    register_detection_distiller(_name)(_cls)

#: The detection distiller registry (``@register_detection_distiller`` adds to it).
det_distiller_dict = DETECTION_DISTILLERS
