"""Distillers registered by upper-case type name, as in mdistiller.

Each method lives in its own file and enters the registry
:data:`mdistiller_blockkd.registry.DISTILLERS` with ``@register_distiller("NAME")``
when imported here; all share ``losses.py`` and the :class:`Distiller` base.
``distiller_dict`` (mdistiller's name) is that registry:
``distiller_dict[cfg.DISTILLER.TYPE](student, teacher, cfg, input_size=S)`` builds one
(the assembler, ``engine.build.build_distiller``, does it from a config).
"""

from ..registry import DISTILLERS, register_distiller
from .base import Distiller, Vanilla
from .blockkd import BlockKD
from .dkd import DKD
from .kd import KD
from .lskd import LSKD
from .reviewkd import ReviewKD

#: mdistiller's name for the distiller registry.
distiller_dict = DISTILLERS

__all__ = ["Distiller", "Vanilla", "KD", "LSKD", "DKD", "ReviewKD", "BlockKD", "distiller_dict", "register_distiller"]
