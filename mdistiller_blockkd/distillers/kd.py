"""KD: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).

``L = CE_WEIGHT * CE(z_s, y) + KD_WEIGHT * T^2 * mean_n KL(softmax(z_t/T) || softmax(z_s/T))``
with ``T = CFG.KD.TEMPERATURE``, ``CE_WEIGHT = CFG.KD.LOSS.CE_WEIGHT`` and
``KD_WEIGHT = CFG.KD.LOSS.KD_WEIGHT`` (mdistiller's keys and defaults). No warm-up.
"""

from __future__ import annotations

import torch.nn.functional as F

from ..errors import ConfigError
from . import losses
from ..registry import register_distiller
from .base import Distiller


@register_distiller("KD")
class KD(Distiller):
    """Vanilla logit distillation (registered as ``KD``).

    The teacher runs once per step without autograd; loss keys ``loss_ce`` and
    ``loss_kd``. No connector parameters.
    """

    #: the registered type name, in messages
    type_name = "KD"
    config_node = "KD"
    table_order = 10

    def __init__(self, student, teacher, cfg, **kwargs):
        super().__init__(student, teacher, cfg, **kwargs)
        if teacher is None:
            raise ConfigError(f"DISTILLER.TYPE {self.type_name} needs a teacher; set DISTILLER.TEACHER")
        self.check_cfg(cfg)
        self.temperature, self.ce_loss_weight, self.kd_loss_weight = self.options(cfg)

    @classmethod
    def check_cfg(cls, cfg) -> None:
        if not float(cls.options(cfg)[0]) > 0:
            raise ConfigError(f"KD.TEMPERATURE is {cfg.KD.TEMPERATURE}; it must be > 0 (mdistiller uses 4)")

    @classmethod
    def options(cls, cfg):
        """``(temperature, ce_weight, kd_weight)`` from this method's config node."""
        c = cfg.KD
        return float(c.TEMPERATURE), float(c.LOSS.CE_WEIGHT), float(c.LOSS.KD_WEIGHT)

    def distance(self, logits_student, logits_teacher):
        """The logit distance (Hinton KD with the T^2 factor)."""
        return losses.kd_loss(logits_student, logits_teacher, self.temperature)

    def forward_train(self, image, target, **kwargs):
        """Return ``(student_logits, {"loss_ce", "loss_kd"})``."""
        logits_student, _ = self.student(image)
        logits_teacher, _ = self.teacher_forward(image)
        loss_ce = self.ce_loss_weight * F.cross_entropy(logits_student, target)
        loss_kd = self.kd_loss_weight * self.distance(logits_student, logits_teacher)
        return logits_student, {"loss_ce": loss_ce, "loss_kd": loss_kd}
