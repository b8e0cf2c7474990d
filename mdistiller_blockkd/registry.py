"""The registries that model families and distillers enter with decorators (as in timm).

This module sits in the bottom layer: it imports nothing of the package but
:mod:`.errors`, so a model family, a distiller, or an *outside* package can register
itself without this package importing it back::

    from mdistiller_blockkd.registry import register_distiller, register_model

    @register_model("my_net")                 # DISTILLER.STUDENT my_net
    def my_net(num_classes=100, **kw): ...

    @register_distiller("MYKD")               # DISTILLER.TYPE MYKD
    class MyKD(Distiller): ...

* :data:`MODELS` -- model name -> ``(constructor, default teacher checkpoint path or None)``
  (the shape of mdistiller's ``cifar_model_dict``; ``models.model_dict`` is this object).
* :data:`DISTILLERS` -- upper-case type name -> distiller class (``distillers.distiller_dict``).

An outside package is found without any edit here in one of two ways: it is imported
before the config is built (``--import my_package`` on the train and eval commands),
or it declares an entry point in the group :data:`PLUGIN_GROUP`
(``[options.entry_points] mdistiller_blockkd.plugins = my = my_package``), which
:func:`load_plugins` imports once.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Optional, Tuple

from .errors import ConfigError

__all__ = [
    "Registry",
    "MODELS",
    "DISTILLERS",
    "DETECTION_DISTILLERS",
    "register_detection_distiller",
    "CIFAR_TEACHER_DIR",
    "PLUGIN_GROUP",
    "register_model",
    "register_distiller",
    "import_modules",
    "load_plugins",
]

#: Entry-point group whose modules are imported by :func:`load_plugins`.
PLUGIN_GROUP = "mdistiller_blockkd.plugins"

#: Where mdistiller keeps its CIFAR-100 teachers (relative to the working directory).
CIFAR_TEACHER_DIR = os.path.join("download_ckpts", "cifar_teachers")


class Registry(dict):
    """A ``dict`` of named entries of one ``kind`` with a ``register`` decorator.

    ``key`` normalises names (the distiller registry upper-cases them). Registering a
    name twice with another object raises :class:`ValueError` unless ``override=True``
    (re-registering the same object, e.g. a module imported twice, is allowed).
    """

    def __init__(self, kind: str, key: Callable[[str], str] = str):
        super().__init__()
        self.kind = kind
        self._key = key

    def add(self, name: str, entry: Any, override: bool = False) -> None:
        """Register ``entry`` under ``name``."""
        k = self._key(name)
        if not override and k in self and self[k] != entry:
            raise ValueError(f"{self.kind} '{k}' is already registered; pass override=True to replace it")
        self[k] = entry

    def register(self, name: Optional[str] = None, override: bool = False, entry: Callable[[Any], Any] = lambda obj: obj):
        """Decorator registering the decorated object (``entry(obj)``) under ``name`` (default ``obj.__name__``)."""

        def deco(obj):
            self.add(name or obj.__name__, entry(obj), override=override)
            return obj

        return deco

    def lookup(self, name: str, setting: str = "") -> Any:
        """The entry of ``name``; an unknown name raises :class:`ConfigError` listing the known ones."""
        k = self._key(str(name).strip())
        if k not in self:
            where = f"{setting} is '{name}'" if setting else f"unknown {self.kind} '{name}'"
            raise ConfigError(f"{where}; known {self.kind}s: {', '.join(sorted(self))}")
        return self[k]


MODELS = Registry("model")
DISTILLERS = Registry("distiller", key=lambda s: s.upper())
#: Detection distillers (``DATASET.TYPE coco``): upper-case type name -> class.
DETECTION_DISTILLERS = Registry("detection distiller", key=lambda s: s.upper())


def register_model(name: str, teacher_ckpt: bool = True, override: bool = False):
    """Decorator: register ``ctor(num_classes=100, **kw) -> StagedModel`` as model ``name``.

    With ``teacher_ckpt`` the model's default teacher checkpoint is mdistiller's
    ``download_ckpts/cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth``.
    """
    path = os.path.join(CIFAR_TEACHER_DIR, f"{name}_vanilla", "ckpt_epoch_240.pth") if teacher_ckpt else None
    return MODELS.register(name, override=override, entry=lambda fn: (fn, path))


def register_distiller(name: str, override: bool = False):
    """Decorator: register a distiller class as ``DISTILLER.TYPE name`` (upper-cased)."""
    return DISTILLERS.register(name, override=override)


def register_detection_distiller(name: str, override: bool = False):
    """Decorator: register a detection distiller class as ``DISTILLER.TYPE name`` for ``DATASET.TYPE coco``."""
    return DETECTION_DISTILLERS.register(name, override=override)


def import_modules(names) -> None:
    """Import each module of ``names`` (an outside package that registers models or distillers).

    An import that fails raises :class:`ConfigError` naming the module.
    """
    for name in names or ():
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"cannot import '{name}' ({e}); install that package or fix the module name") from None


_plugins_loaded = False


def load_plugins() -> Tuple[str, ...]:
    """Import, once, every module declared in the entry-point group :data:`PLUGIN_GROUP`; return their names."""
    global _plugins_loaded
    if _plugins_loaded:
        return ()
    _plugins_loaded = True
    from importlib.metadata import entry_points

    names = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin is the user's to fix, say which
            raise ConfigError(f"plugin '{ep.name}' ({ep.value}, entry point group {PLUGIN_GROUP}) failed to load: "
                              f"{type(e).__name__}: {e}") from None
        names.append(ep.value)
    return tuple(names)

