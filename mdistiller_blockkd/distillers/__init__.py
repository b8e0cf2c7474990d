"""Distillers registered by upper-case type name, as in mdistiller.

``distiller_dict[cfg.DISTILLER.TYPE](student, teacher, cfg)`` builds one. Each method
lives in its own file; all share ``losses.py`` and the ``Distiller`` base.
"""

from .base import Distiller, Vanilla
from .blockkd import BlockKD
from .dkd import DKD
from .kd import KD
from .lskd import LSKD
from .reviewkd import ReviewKD

distiller_dict = {"NONE": Vanilla, "KD": KD, "LSKD": LSKD, "DKD": DKD, "REVIEWKD": ReviewKD, "BLOCKKD": BlockKD}

__all__ = ["Distiller", "Vanilla", "KD", "LSKD", "DKD", "ReviewKD", "BlockKD", "distiller_dict"]
