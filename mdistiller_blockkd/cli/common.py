"""Helpers shared by the commands (benchmark, report, study, demo).

* :func:`atomic_write_text` / :func:`atomic_write_bytes_from` -- atomic file writes
  (re-exported from :mod:`mdistiller_blockkd.utils.fileio`).
* :func:`split_overrides` -- ``KEY=VALUE`` / ``KEY VALUE`` tokens to a flat yacs list.
* :func:`split_top_level` -- split on a separator outside brackets and quotes.
* :func:`cfg_get` / :func:`default_value` -- read a dotted key from a config (yacs node or
  plain dict loaded from ``config.yaml``) and its default in the package config.
* :func:`variant_label` / :func:`method_label` -- the label that names a method's
  variant (``BLOCKKD sample:1``), used by both tools so their tables agree.
* :func:`mean_std` -- mean and sample standard deviation.
* :func:`read_metrics` -- read a run's ``metrics.jsonl`` tolerating a half-written last line.
* :func:`check_output_path` -- refuse, before any work, an output path of the wrong kind.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from ..errors import ConfigError, UserError
from ..utils.fileio import atomic_write_bytes_from, atomic_write_text, read_json_lines  # noqa: F401 - re-exported for the tools

#: Config keys whose non-default value names a variant of a method. A key under a
#: distiller's node (``BLOCKKD.*``) only labels runs of that distiller.
DEFAULT_LABEL_KEYS: Tuple[str, ...] = ("BLOCKKD.STONES", "BLOCKKD.LOGIT_LOSS", "BLOCKKD.CONNECTOR",
                                        "BLOCKKD.STONE_SCALE", "BLOCKKD.STONE_WEIGHTS")
#: Keys whose value alone reads as the variant (``sample:1``); other keys show as ``NAME=value``.
BARE_LABEL_KEYS: Tuple[str, ...] = ("BLOCKKD.STONES", "BLOCKKD.LOGIT_LOSS", "BLOCKKD.CONNECTOR")

#: Distiller node names of the config (a key under one of them only concerns that method).
DISTILLER_NODES: Tuple[str, ...] = ("KD", "LSKD", "DKD", "REVIEWKD", "BLOCKKD")

_MISSING = object()


def split_top_level(text: str, sep: str = ",") -> List[str]:
    """Split ``text`` on ``sep`` where it is outside brackets/parentheses and quotes."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def split_overrides(tokens: Sequence[str]) -> List[str]:
    """Turn ``["A.B=1", "C.D", "2"]`` into the flat yacs list ``["A.B", "1", "C.D", "2"]``.

    A token containing ``=`` is one ``KEY=VALUE`` override; other tokens must come in
    ``KEY VALUE`` pairs (mdistiller's command-line style).
    """
    flat: List[str] = []
    pending: Optional[str] = None
    for tok in tokens:
        if pending is not None:
            flat += [pending, tok]
            pending = None
        elif "=" in tok:
            key, _, value = tok.partition("=")
            if not key or not value:
                raise ConfigError(f"override '{tok}' must read KEY=VALUE, e.g. BLOCKKD.STONES=sample:1")
            flat += [key.strip(), value.strip()]
        else:
            pending = tok
    if pending is not None:
        raise ConfigError(f"override '{pending}' has no value; write KEY=VALUE (e.g. SOLVER.BATCH_SIZE=32)")
    return flat


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
    """Whether the dotted config ``key`` can matter to a run of distiller ``kind``."""
    node = key.split(".", 1)[0].upper()
    return node not in DISTILLER_NODES or node == kind.upper()


def variant_label(cfg: Any, label_keys: Iterable[str] = DEFAULT_LABEL_KEYS, reference=None) -> str:
    """Space-separated non-default values of ``label_keys`` that concern this run's method.

    ``""`` for the method's default variant. A key under a distiller node (``BLOCKKD.*``)
    only counts when ``DISTILLER.TYPE`` is that distiller; the keys of
    :data:`BARE_LABEL_KEYS` show the bare value (``sample:1``), other keys
    ``NAME=value`` with the last key component (``T=2.0``). ``reference`` (a callable
    ``(key, kind) -> value``) replaces the package default as what counts as default.
    """
    kind = str(cfg_get(cfg, "DISTILLER.TYPE", "NONE")).upper()
    parts = []
    for key in label_keys:
        if not key_concerns(key, kind):
            continue
        value = cfg_get(cfg, key, _MISSING)
        if value is _MISSING:
            continue
        ref = default_value(key) if reference is None else reference(key, kind)
        if _norm(value) == _norm(ref):
            continue
        parts.append(_show(value) if key in BARE_LABEL_KEYS else f"{key.rsplit('.', 1)[-1]}={_show(value)}")
    return " ".join(parts)


def method_label(kind: str, variant: str) -> str:
    """``"BLOCKKD"`` or ``"BLOCKKD sample:1"``."""
    return f"{kind} {variant}".strip()


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (``ddof = 1``; 0.0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std of an empty list")
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return m, math.sqrt(var)


def read_metrics(path: str, skip_damaged: bool = True) -> Tuple[List[dict], List[str]]:
    """Records of a ``metrics.jsonl`` file and warnings about lines that could not be read.

    Read with :func:`~mdistiller_blockkd.utils.fileio.read_json_lines` (a last line cut
    short is dropped with a warning; other bad lines are skipped with one when
    ``skip_damaged``, else raise ``ValueError``). Records are sorted by ``epoch`` when
    every record has one; a repeated epoch (a resumed run) keeps the last record.
    """
    warnings: List[str] = []
    records = read_json_lines(path, warnings, skip_damaged)
    if records and all(isinstance(r.get("epoch"), (int, float)) for r in records):
        by_epoch = {}
        for r in records:
            by_epoch[r["epoch"]] = r
        records = [by_epoch[e] for e in sorted(by_epoch)]
    return records, warnings


def check_output_path(path: Optional[str], option: str, folder: bool = False) -> None:
    """Raise :class:`UserError` when ``path`` (given as ``option``) cannot be the file -- or,
    with ``folder``, the folder -- a command will write: an empty path, an existing folder
    where a file is needed, an existing file where a folder is needed, or a path under a
    file. ``None`` (option not given) passes. Reads only, so a command can check its
    outputs before it works for minutes."""
    if path is None:
        return
    kind = "folder" if folder else "file"
    if not str(path).strip():
        raise UserError(f"{option} is empty; give a {kind} path")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{option} '{path}' is a file, not a folder; give a folder path (it is created if missing)")
    if not folder and os.path.isdir(path):
        raise UserError(f"{option} '{path}' is a folder; give a file path (a name inside that folder, for example)")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{option} '{path}' lies under '{parent}', which is a file, not a folder; choose another path")
