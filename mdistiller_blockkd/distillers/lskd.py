"""LSKD: KD on logit-standardised logits (Sun et al., "Logit Standardization in Knowledge
Distillation", CVPR 2024).

``L = CE_WEIGHT * CE(z_s, y) + KD_WEIGHT * T^2 * mean_n KL(softmax(std(z_t)/T) || softmax(std(z_s)/T))``
where ``std`` z-scores each row of logits (``losses.standardize``); ``T = CFG.LSKD.T``,
``CE_WEIGHT = CFG.LSKD.CE_WEIGHT``, ``KD_WEIGHT = CFG.LSKD.KD_WEIGHT`` (defaults T 2,
0.1 and 9). No warm-up. It is the baseline for Block-KD with ``BLOCKKD.LOGIT_LOSS lskd``.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..registry import register_distiller
from . import losses
from .kd import KD


@register_distiller("LSKD")
class LSKD(KD):
    """Logit-standardised KD (registered as ``LSKD``): :class:`KD` with z-scored logits and ``CFG.LSKD``."""

    type_name = "LSKD"
    config_node = "LSKD"
    hyper_keys = ("LSKD.T", "LSKD.CE_WEIGHT", "LSKD.KD_WEIGHT")
    table_order = 20

    @classmethod
    def check_cfg(cls, cfg) -> None:
        if not float(cfg.LSKD.T) > 0:
            raise ConfigError(f"LSKD.T is {cfg.LSKD.T}; the temperature must be > 0 (default 2)")

    @classmethod
    def options(cls, cfg):
        c = cfg.LSKD
        return float(c.T), float(c.CE_WEIGHT), float(c.KD_WEIGHT)

    def distance(self, logits_student, logits_teacher):
        """KD on z-scored logits."""
        return losses.lskd_loss(logits_student, logits_teacher, self.temperature)
