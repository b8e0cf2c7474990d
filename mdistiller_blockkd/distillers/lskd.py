"""LSKD: KD on logit-standardised logits (Sun et al., "Logit Standardization in Knowledge
Distillation", CVPR 2024).

``L = CE_WEIGHT * CE(z_s, y) + KD_WEIGHT * T^2 * mean_n KL(softmax(std(z_t)/T) || softmax(std(z_s)/T))``
where ``std`` z-scores each row of logits (``losses.standardize``); ``T = CFG.LSKD.T``,
``CE_WEIGHT = CFG.LSKD.CE_WEIGHT``, ``KD_WEIGHT = CFG.LSKD.KD_WEIGHT`` (defaults T 2,
0.1 and 9). No warm-up. It is the baseline for Block-KD with ``BLOCKKD.LOGIT_LOSS lskd``.
"""

from __future__ import annotations

import torch.nn.functional as F

from ..errors import ConfigError
from . import losses
from ..registry import register_distiller
from .base import Distiller


@register_distiller("LSKD")
class LSKD(Distiller):
    """Logit-standardised KD (registered as ``LSKD``); loss keys ``loss_ce`` and ``loss_kd``."""

    @classmethod
    def check_cfg(cls, cfg) -> None:
        if not float(cfg.LSKD.T) > 0:
            raise ConfigError(f"LSKD.T is {cfg.LSKD.T}; the temperature must be > 0 (default 2)")

    def __init__(self, student, teacher, cfg, **kwargs):
        super().__init__(student, teacher, cfg, **kwargs)
        if teacher is None:
            raise ConfigError("DISTILLER.TYPE LSKD needs a teacher; set DISTILLER.TEACHER")
        self.check_cfg(cfg)
        c = cfg.LSKD
        self.temperature = float(c.T)
        self.ce_loss_weight = float(c.CE_WEIGHT)
        self.kd_loss_weight = float(c.KD_WEIGHT)

    def forward_train(self, image, target, **kwargs):
        """Return ``(student_logits, {"loss_ce", "loss_kd"})``."""
        logits_student, _ = self.student(image)
        logits_teacher, _ = self.teacher_forward(image)
        loss_ce = self.ce_loss_weight * F.cross_entropy(logits_student, target)
        loss_kd = self.kd_loss_weight * losses.lskd_loss(logits_student, logits_teacher, self.temperature)
        return logits_student, {"loss_ce": loss_ce, "loss_kd": loss_kd}
