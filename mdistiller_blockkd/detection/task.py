"""The detection task: what the shared :class:`~mdistiller_blockkd.engine.trainer.Trainer` needs.

``DATASET.TYPE coco`` selects it (:func:`is_detection`). :func:`build_detection_run`
builds the loaders, the distiller and a :class:`DetectionTask`, which the trainer calls
for the parts that differ from classification:

* ``to_device(images, targets, device)`` -- lists of images and target dicts;
* ``step_counts(preds, targets)`` -- ``(n, correct)`` for the epoch's ``train_acc``:
  ``n`` is the number of images (loss averages are per image batch as in
  classification), ``train_acc`` is the accuracy of the ROI head on its sampled
  proposals (percent, averaged over steps weighted by images);
* ``evaluate(trainer, epoch)`` -- COCO metrics of the student on the validation split as
  ``test_AP, test_AP50, test_AP75, test_APs, test_APm, test_APl`` (percent);
* ``score_key`` -- ``test_AP``: ``best_acc`` and the ``best`` checkpoints track box AP;
* ``summary(record)`` -- the epoch's log line.

Checkpoints, resume, logs, DDP (``torchrun``) are the trainer's, unchanged.
"""

from __future__ import annotations

import math
import os
from typing import Dict

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..data.common import ShardSampler
from ..errors import CheckpointError, ConfigError
from .data import build_detection_datasets, collate, describe_detection_data, targets_to
from .distillers import det_distiller_dict
from .evaluate import METRICS, evaluate_detector
from .models import build_detector, detector_backbone_name, load_detector_weights, missing_teacher_error

__all__ = ["is_detection", "DetectionTask", "build_detection_run", "build_detection_distiller",
           "check_detection_config", "detection_loaders", "benchmark_batch"]


def is_detection(cfg) -> bool:
    """True for ``DATASET.TYPE coco``."""
    return str(cfg.DATASET.TYPE).strip().lower() == "coco"


def _kind(cfg) -> str:
    kind = str(cfg.DISTILLER.TYPE).strip().upper()
    if kind not in det_distiller_dict:
        raise ConfigError(f"DISTILLER.TYPE '{cfg.DISTILLER.TYPE}' is not available for detection (DATASET.TYPE coco); "
                          f"use one of {', '.join(det_distiller_dict)}")
    return kind


def check_detection_config(cfg) -> None:
    """Fail fast, before data is read: distiller type, model names, the teacher file."""
    kind = _kind(cfg)
    if int(cfg.DATASET.VAL_SPLIT):
        raise ConfigError(f"DATASET.VAL_SPLIT is {cfg.DATASET.VAL_SPLIT}; a validation split held out of the training "
                          "images is not supported for detection (DATASET.TYPE coco): leave it 0, the runs are "
                          "scored on DETECTION.TEST_SET")
    detector_backbone_name(cfg.DISTILLER.STUDENT)
    if kind != "NONE":
        detector_backbone_name(cfg.DISTILLER.TEACHER)
        if not str(cfg.DISTILLER.TEACHER_CKPT):
            raise ConfigError(f"DISTILLER.TYPE {kind} on detection needs the teacher's weights: set "
                              "DISTILLER.TEACHER_CKPT to a local file (torchvision's COCO weights or a detection "
                              "run's student_best)")
        path = os.path.expanduser(str(cfg.DISTILLER.TEACHER_CKPT))
        if not os.path.isfile(path):
            raise missing_teacher_error(path, str(cfg.DISTILLER.TEACHER))
    ckpt = str(cfg.DETECTION.STUDENT_BACKBONE_CKPT)
    if ckpt and not os.path.isfile(os.path.expanduser(ckpt)):
        raise CheckpointError(f"DETECTION.STUDENT_BACKBONE_CKPT '{ckpt}' not found; give a local file with the "
                              f"ImageNet weights of torchvision's {detector_backbone_name(cfg.DISTILLER.STUDENT)} "
                              "(e.g. resnet18-f37072fd.pth) or leave it empty to start from random weights")


def _load_student_backbone(model, path: str) -> None:
    from ..utils.checkpoint import extract_state_dict, load_checkpoint

    sd = extract_state_dict(load_checkpoint(os.path.expanduser(path)), path)
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    body = model.backbone.body
    missing, unexpected = body.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"'{path}' does not fit the student's ResNet body ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected keys, e.g. {', '.join((missing + unexpected)[:3])}); "
                              "give torchvision's ImageNet weights of the same ResNet")


def build_detection_distiller(cfg, num_classes: int, device="cpu", load_teacher: bool = True):
    """The detection distiller of ``cfg`` (student fresh, teacher from ``DISTILLER.TEACHER_CKPT``).

    ``load_teacher=False`` keeps the teacher's random weights (timing only: tools/benchmark.py).
    """
    kind = _kind(cfg)
    if load_teacher:
        check_detection_config(cfg)
    student = build_detector(cfg.DISTILLER.STUDENT, num_classes, cfg.DETECTION, norm=str(cfg.DETECTION.STUDENT_NORM))
    if str(cfg.DETECTION.STUDENT_BACKBONE_CKPT):
        _load_student_backbone(student, str(cfg.DETECTION.STUDENT_BACKBONE_CKPT))
    teacher = None
    if kind != "NONE":
        teacher = build_detector(cfg.DISTILLER.TEACHER, num_classes, cfg.DETECTION, norm="frozen_bn")
        if load_teacher:
            load_detector_weights(teacher, str(cfg.DISTILLER.TEACHER_CKPT), str(cfg.DISTILLER.TEACHER), num_classes)
    return det_distiller_dict[kind](student, teacher, cfg).to(torch.device(device))


def detection_loaders(cfg, train_set, val_set, rank: int = 0, world_size: int = 1):
    """Train loader (DistributedSampler seeded by EXPERIMENT.SEED, drop_last) and val loader (ShardSampler)."""
    workers, batch, test_batch = int(cfg.DATASET.NUM_WORKERS), int(cfg.SOLVER.BATCH_SIZE), int(cfg.DATASET.TEST.BATCH_SIZE)
    if workers < 0 or test_batch < 1:
        raise ConfigError("DATASET.NUM_WORKERS must be >= 0 and DATASET.TEST.BATCH_SIZE >= 1")
    if math.ceil(len(train_set) / world_size) < batch:
        raise ConfigError(f"the training split has {len(train_set)} images ({math.ceil(len(train_set) / world_size)} "
                          f"per process) but SOLVER.BATCH_SIZE is {batch}; lower SOLVER.BATCH_SIZE")
    seed = int(cfg.EXPERIMENT.SEED)
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), collate_fn=collate)
    train_loader = DataLoader(train_set, batch_size=batch, drop_last=True, persistent_workers=False,
                              sampler=DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                                         seed=seed),
                              generator=torch.Generator().manual_seed(seed * 1000 + rank), **common)
    val_loader = DataLoader(val_set, batch_size=test_batch, shuffle=False, drop_last=False,
                            sampler=ShardSampler(len(val_set), rank, world_size), **common)
    return train_loader, val_loader


class DetectionTask:
    """Trainer hooks for detection (see the module docstring)."""

    score_key = "test_AP"

    def __init__(self, val_set):
        self.val_set = val_set

    def to_device(self, images, targets, device, channels_last: bool = False):
        """Images (a list; ``channels_last`` does not apply to torchvision's detectors) and their targets."""
        return [im.to(device, non_blocking=True) for im in images], targets_to(targets, device)

    def step_counts(self, preds, targets):
        logits, labels = preds
        n = len(targets)
        acc = (logits.argmax(dim=1) == labels).float().mean() if labels.numel() else logits.new_zeros(())
        return n, acc * n

    def evaluate(self, trainer, epoch=None) -> Dict[str, float]:
        trainer.distiller.eval()
        m = evaluate_detector(trainer.distiller.forward_test, trainer.val_loader, self.val_set, trainer.device,
                              amp_dtype=trainer.amp_dtype, progress=trainer.progress,
                              desc=f"eval {epoch}" if epoch is not None else "eval")
        return {f"test_{k}": v for k, v in m.items()}

    def summary(self, record: dict, epochs: int) -> str:
        return (f"epoch {record['epoch']}/{epochs} lr {record['lr']:.4g} | train loss {record['train_loss']:.4f} "
                f"roi acc {record['train_acc']:.2f} | AP {record['test_AP']:.2f} AP50 {record['test_AP50']:.2f} "
                f"AP75 {record['test_AP75']:.2f} APs {record['test_APs']:.2f} APm {record['test_APm']:.2f} "
                f"APl {record['test_APl']:.2f} | best AP {record['best_acc']:.2f} | {record['epoch_time_s']:.1f}s, "
                f"{record['ms_per_step']:.1f} ms/step")


def build_detection_run(cfg, rank: int = 0, world_size: int = 1, device="cpu"):
    """``(train_loader, val_loader, distiller, task, description)`` for a detection config."""
    check_detection_config(cfg)
    train_set, val_set, num_classes = build_detection_datasets(cfg)
    if len(val_set) < world_size:
        raise ConfigError(f"the validation split has {len(val_set)} images, fewer than the {world_size} processes")
    train_loader, val_loader = detection_loaders(cfg, train_set, val_set, rank, world_size)
    distiller = build_detection_distiller(cfg, num_classes, device)
    return train_loader, val_loader, distiller, DetectionTask(val_set), describe_detection_data(cfg, train_set, val_set)


def benchmark_batch(batch_size: int, image_size: int, num_classes: int, seed: int = 0):
    """A fixed random detection batch for timing: images and 1-3 random boxes each (labels 1..num_classes-1)."""
    g = torch.Generator().manual_seed(seed + 1)
    images, targets = [], []
    for _ in range(batch_size):
        images.append(torch.rand(3, image_size, image_size, generator=g))
        n = int(torch.randint(1, 4, (), generator=g))
        xy = torch.rand(n, 2, generator=g) * image_size * 0.6
        wh = (0.15 + 0.25 * torch.rand(n, 2, generator=g)) * image_size
        targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=image_size)], dim=1),
                        "labels": torch.randint(1, num_classes, (n,), generator=g)})
    return images, targets


METRIC_KEYS = tuple(f"test_{k}" for k in METRICS)
