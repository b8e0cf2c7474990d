"""What names a run's method and variant, derived from the distiller registry.

Each distiller class declares its config node and which of its keys name a variant
(:class:`~mdistiller_blockkd.distillers.Distiller`: ``config_node``, ``label_keys``,
``bare_label_keys``, ``hyper_keys``, ``table_order``). The report, the benchmark and the
study read the lists here, so a distiller registered by an outside package with
``@register_distiller`` is labelled, ordered and benchmarked with no edit of this package.

* :func:`label_keys` -- keys whose non-default value names a variant (``BLOCKKD sample:1``);
* :func:`hyper_label_keys` -- hyper-parameters that name a variant only where a run differs
  from most runs of a report (``SOLVER.EPOCHS`` and every distiller's ``hyper_keys``);
* :func:`variant_label` / :func:`method_label` -- the label of a run's variant and method;
* :func:`method_sort_key` -- table order of methods;
* :func:`cfg_get` / :func:`default_value` -- a dotted key of a config (yacs node or plain dict).
"""

from __future__ import annotations

import json
from typing import Any, Iterable, List, Optional, Tuple

from ..distillers import distiller_dict

__all__ = ["label_keys", "bare_label_keys", "hyper_label_keys", "report_label_keys", "distiller_nodes",
           "key_concerns", "variant_label", "method_label", "method_sort_key", "cfg_get", "default_value"]

_MISSING = object()


def _classes() -> List[type]:
    return sorted(distiller_dict.values(), key=lambda c: (getattr(c, "table_order", 100), c.__name__))


def _union(attr: str) -> Tuple[str, ...]:
    out: List[str] = []
    for cls in _classes():
        for key in getattr(cls, attr, ()):
            if key not in out:
                out.append(key)
    return tuple(out)


def label_keys() -> Tuple[str, ...]:
    """Every registered distiller's ``label_keys``, in table order."""
    return _union("label_keys")


def bare_label_keys() -> Tuple[str, ...]:
    """Keys whose value alone reads as the variant (``sample:1``); other keys show as ``NAME=value``."""
    return _union("bare_label_keys")


#: Recipe keys that name a variant where a run differs from most runs of a report.
RECIPE_LABEL_KEYS = ("SOLVER.EPOCHS", "SOLVER.AMP")
#: Recipe keys named against the package default, never the majority: a precision is a
#: setting of its own (``AMP=bf16``), whichever precision most runs of a report used.
DEFAULT_REFERENCED_KEYS = ("SOLVER.AMP",)


def hyper_label_keys() -> Tuple[str, ...]:
    """:data:`RECIPE_LABEL_KEYS` (``SOLVER.EPOCHS``, ``SOLVER.AMP``) and every registered distiller's ``hyper_keys``."""
    return RECIPE_LABEL_KEYS + _union("hyper_keys")


def report_label_keys() -> Tuple[str, ...]:
    """What the report labels variants by: :func:`label_keys` then :func:`hyper_label_keys`."""
    return label_keys() + hyper_label_keys()


def distiller_nodes() -> Tuple[str, ...]:
    """Config nodes that belong to one distiller (a key under one of them only concerns that method)."""
    return tuple(dict.fromkeys(c.config_node for c in _classes() if getattr(c, "config_node", None)))


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """Value of the dotted ``key`` in a yacs node or a nested dict; ``default`` when absent."""
    node = cfg
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return default
    return node


def default_value(key: str) -> Any:
    """Default of the dotted ``key`` in the package config; ``None`` for a key it does not have."""
    from ..config import CFG

    return cfg_get(CFG, key, None)


def _norm(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip().lower()
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    return value


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), separators=(",", ":"))
    return str(value)


def key_concerns(key: str, kind: str) -> bool:
    """Whether the dotted config ``key`` can matter to a run of distiller ``kind``.

    A key under a distiller's node (:func:`distiller_nodes`) concerns that distiller (and
    its subclasses that keep the node) alone; other keys concern every method.
    """
    node = key.split(".", 1)[0].upper()
    if node not in distiller_nodes():
        return True
    cls = distiller_dict.get(kind.upper())
    return cls is not None and getattr(cls, "config_node", None) == node


def format_label(key: str, value: Any, bare: Iterable[str] = ()) -> str:
    """``sample:1`` for a bare key, else ``NAME=value`` with the key's last component."""
    return _show(value) if key in tuple(bare) else f"{key.rsplit('.', 1)[-1]}={_show(value)}"


def variant_label(cfg: Any, keys: Optional[Iterable[str]] = None, reference=None) -> str:
    """Space-separated non-default values of ``keys`` (default :func:`label_keys`) that concern this run's method.

    ``""`` for the method's default variant. A key under a distiller node (``BLOCKKD.*``)
    only counts when ``DISTILLER.TYPE`` is that distiller; the keys of
    :func:`bare_label_keys` show the bare value (``sample:1``), other keys
    ``NAME=value`` with the last key component (``T=2.0``). ``reference`` (a callable
    ``(key, kind) -> value``) replaces the package default as what counts as default.
    """
    kind = str(cfg_get(cfg, "DISTILLER.TYPE", "NONE")).upper()
    bare = bare_label_keys()
    parts = []
    for key in (label_keys() if keys is None else keys):
        if not key_concerns(key, kind):
            continue
        value = cfg_get(cfg, key, _MISSING)
        if value is _MISSING:
            continue
        ref = default_value(key) if reference is None else reference(key, kind)
        if _norm(value) == _norm(ref):
            continue
        parts.append(format_label(key, value, bare))
    return " ".join(parts)


def method_label(kind: str, variant: str) -> str:
    """``"BLOCKKD"`` or ``"BLOCKKD sample:1"``."""
    return f"{kind} {variant}".strip()


def method_sort_key(method: str) -> tuple:
    """Table order of a method label: the distiller's ``table_order``, then its name, then its variant."""
    kind, _, variant = method.partition(" ")
    cls = distiller_dict.get(kind)
    return (getattr(cls, "table_order", 100) if cls is not None else 1000, kind, variant != "", variant)
