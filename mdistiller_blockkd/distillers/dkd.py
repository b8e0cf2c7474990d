"""DKD: Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022).

Splits KD into the target-class term TCKD (KL between the binary distributions
``[p_gt, 1 - p_gt]``) and the non-target term NCKD (KL between the distributions over
the non-target classes), each ``T^2 * batch-mean``:

``L = CE_WEIGHT * CE + min(epoch / WARMUP, 1) * (ALPHA * TCKD + BETA * NCKD)``

with mdistiller's ``CFG.DKD`` keys (CE_WEIGHT, ALPHA, BETA, T, WARMUP).
"""

from __future__ import annotations

import torch.nn.functional as F

from ..errors import ConfigError
from . import losses
from ..registry import register_distiller
from .base import Distiller


def require_epoch(kwargs, method: str):
    """Return ``kwargs["epoch"]``; a warm-up needs the (1-based, float allowed) epoch."""
    try:
        return kwargs["epoch"]
    except KeyError:
        raise TypeError(f"{method}.forward_train needs the keyword argument epoch=<current epoch> for its warm-up") from None


@register_distiller("DKD")
class DKD(Distiller):
    """Decoupled KD (registered as ``DKD``); loss keys ``loss_ce`` and ``loss_kd``.

    ``forward_train`` needs ``epoch`` (the warm-up ramps the distillation term linearly
    over the first ``WARMUP`` epochs). No connector parameters.
    """

    config_node = "DKD"
    table_order = 30

    def __init__(self, student, teacher, cfg, **kwargs):
        super().__init__(student, teacher, cfg, **kwargs)
        if teacher is None:
            raise ConfigError("DISTILLER.TYPE DKD needs a teacher; set DISTILLER.TEACHER")
        c = cfg.DKD
        self.ce_loss_weight = float(c.CE_WEIGHT)
        self.alpha = float(c.ALPHA)
        self.beta = float(c.BETA)
        self.temperature = float(c.T)
        self.warmup = float(c.WARMUP)
        if self.temperature <= 0:
            raise ConfigError(f"DKD.T is {c.T}; it must be > 0 (mdistiller uses 4.0)")
        if self.warmup < 0:
            raise ConfigError(f"DKD.WARMUP is {c.WARMUP}; use a number of epochs >= 0 (0 = no warm-up)")

    def forward_train(self, image, target, **kwargs):
        """Return ``(student_logits, {"loss_ce", "loss_kd"})``; needs ``epoch=``."""
        warm = losses.warmup_factor(require_epoch(kwargs, "DKD"), self.warmup)
        logits_student, _ = self.student(image)
        logits_teacher, _ = self.teacher_forward(image)
        loss_ce = self.ce_loss_weight * F.cross_entropy(logits_student, target)
        loss_dkd = warm * losses.dkd_loss(
            logits_student, logits_teacher, target, self.alpha, self.beta, self.temperature
        )
        return logits_student, {"loss_ce": loss_ce, "loss_kd": loss_dkd}
