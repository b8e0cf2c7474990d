"""Model names with options: ``<model>,key=value,...``.

A model name may carry build options after commas, so that the name alone (the value of
``DISTILLER.STUDENT`` / ``DISTILLER.TEACHER``, a benchmark entry, the eval command's
``--model``) says everything about the architecture:

* ``timm:deit_tiny_patch16_224,img_size=32,patch_size=8,depth=4,blocks=2`` -- timm's
  keyword arguments (``img_size``, ``patch_size``, ``depth``, ``drop_path_rate``...) plus
  ``blocks`` for ViTs (:mod:`.timm_vit`);
* ``hf:/models/minilm,layers=3,pick=every_other`` -- the options of ``hf:`` encoders
  (:mod:`.hf_encoder`).

Values are Python literals where they parse as one (``32``, ``0.1``, ``True``; ``true``
and ``false`` too), else strings (``every_other``). A folder path containing a comma
cannot be named this way.
"""

from __future__ import annotations

import ast
from typing import Dict, Tuple

from ..errors import ConfigError

__all__ = ["split_model_spec"]


def _value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def split_model_spec(name: str) -> Tuple[str, Dict[str, object]]:
    """``"timm:x,img_size=32"`` -> ``("timm:x", {"img_size": 32})``; a malformed option raises :class:`ConfigError`."""
    base, *options = str(name).split(",")
    kwargs: Dict[str, object] = {}
    for option in options:
        key, eq, value = option.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier() or not value.strip():
            raise ConfigError(f"model '{name}': option '{option}' is not key=value; write options as "
                              "<model>,key=value,... e.g. timm:deit_tiny_patch16_224,img_size=32,patch_size=8")
        if key in kwargs:
            raise ConfigError(f"model '{name}': option '{key}' is given twice")
        kwargs[key] = _value(value.strip())
    return base.strip(), kwargs
