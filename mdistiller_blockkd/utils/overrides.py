"""Command-line override tokens: ``KEY=VALUE`` / ``KEY VALUE`` to yacs's flat list."""

from __future__ import annotations

from typing import List, Optional, Sequence

from ..errors import ConfigError

__all__ = ["split_top_level", "split_overrides"]


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
