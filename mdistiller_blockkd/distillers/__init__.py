"""Distillers registered by upper-case type name, as in mdistiller.

``distiller_dict[cfg.DISTILLER.TYPE](student, teacher, cfg)`` builds one.
"""

from .base import Distiller, Vanilla

distiller_dict = {"NONE": Vanilla}


def _register_optional():
    # each method lives in its own file; import failures here are real bugs, not optional
    from .kd import KD
    from .dkd import DKD
    from .reviewkd import ReviewKD
    from .blockkd import BlockKD

    distiller_dict.update({"KD": KD, "DKD": DKD, "REVIEWKD": ReviewKD, "BLOCKKD": BlockKD})


try:
    _register_optional()
except ModuleNotFoundError as _e:  # pragma: no cover - only while methods are being added
    if not _e.name.startswith(__name__):
        raise

__all__ = ["Distiller", "Vanilla", "distiller_dict"]
