"""Distillers registered by upper-case type name, as in mdistiller.

``distiller_dict[cfg.DISTILLER.TYPE](student, teacher, cfg)`` builds one. Each method
lives in its own file: ``kd.py``, ``dkd.py``, ``reviewkd.py``, ``blockkd.py``.
"""

import importlib

from .base import Distiller, Vanilla

distiller_dict = {"NONE": Vanilla}

for _name, _module, _cls in (("KD", "kd", "KD"), ("DKD", "dkd", "DKD"), ("REVIEWKD", "reviewkd", "ReviewKD"),
                             ("BLOCKKD", "blockkd", "BlockKD")):
    try:
        distiller_dict[_name] = getattr(importlib.import_module(f"{__name__}.{_module}"), _cls)
    except ModuleNotFoundError as _e:  # TEMPORARY while methods are being written
        if _e.name != f"{__name__}.{_module}":
            raise

__all__ = ["Distiller", "Vanilla", "distiller_dict"]
