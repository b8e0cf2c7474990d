"""What a run prints while it works: colours and progress, for a terminal and for a log file alike.

A terminal (the stream is a TTY) keeps mdistiller's coloured ``[INFO]`` lines and tqdm's
redrawn bars. Anything else -- a Slurm log, a CI log, a pipe -- gets plain text: no colour
escapes, no carriage returns; a loop's progress is then one line every ``LOG.PROGRESS_EVERY_S``
seconds and/or every ``LOG.PROGRESS_EVERY_PCT`` percent of its steps (0 turns that trigger
off), e.g. ``epoch 3/240: 1204/3910 steps (30%), 61 s, eta 142 s, loss=1.234 lr=0.05``.
Colours are also off whenever the ``NO_COLOR`` environment variable is set to a non-empty
value (https://no-color.org).

:func:`progress` is the one progress helper of the trainer's step loop and of both evaluation
loops (classification and detection).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, TextIO, Union

__all__ = ["ProgressEvery", "progress_settings", "colour_on", "progress", "Progress"]


@dataclass(frozen=True)
class ProgressEvery:
    """When a plain progress line is written: every ``seconds`` and/or every ``percent`` of the steps (0: never)."""

    seconds: float = 30.0
    percent: int = 0


def progress_settings(cfg) -> Optional[ProgressEvery]:
    """``LOG.PROGRESS*`` of ``cfg`` (None when ``LOG.PROGRESS`` is off)."""
    if not cfg.LOG.PROGRESS:
        return None
    return ProgressEvery(float(cfg.LOG.PROGRESS_EVERY_S), int(cfg.LOG.PROGRESS_EVERY_PCT))


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def colour_on(stream: Optional[TextIO] = None) -> bool:
    """Colour escapes for ``stream`` (default stdout): only on a terminal, and never with ``NO_COLOR`` set."""
    return not os.environ.get("NO_COLOR") and _is_tty(sys.stdout if stream is None else stream)


class Progress:
    """Plain progress lines for a loop of ``total`` steps (see the module docstring); also a no-op
    (``every`` None) or, on a terminal, a tqdm bar. ``update(n)``, ``set_postfix(**values)``,
    ``close()``; a context manager."""

    def __init__(self, total: int, desc: str, every: Optional[ProgressEvery], stream: Optional[TextIO] = None,
                 bar_stream: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic, initial: int = 0):
        self.total, self.desc, self.every = int(total), desc, every
        self.n, self._postfix, self._bar = int(initial), {}, None
        self._initial = self.n  # steps done before this loop started (a resumed epoch)
        self._stream = stream
        self._clock = clock
        self._start = self._last = clock()
        self._last_pct = 0
        if every is not None:
            bar_stream = sys.stderr if bar_stream is None else bar_stream  # where tqdm draws (its default)
            if _is_tty(bar_stream):
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, initial=self.n, desc=desc, leave=False, dynamic_ncols=True,
                                 file=bar_stream)

    def set_postfix(self, **values) -> None:
        """Values shown after the count (``loss=...``), in the bar or in the next line."""
        self._postfix = {k: str(v) for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(self._postfix, refresh=False)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.every is not None:
            self._maybe_line()

    def _maybe_line(self) -> None:
        now = self._clock()
        pct = 100 * self.n // self.total if self.total > 0 else 100
        by_time = self.every.seconds > 0 and now - self._last >= self.every.seconds
        by_pct = self.every.percent > 0 and pct // self.every.percent > self._last_pct // self.every.percent
        if not (by_time or by_pct):
            return
        self._last, self._last_pct = now, pct
        elapsed = now - self._start
        done = self.n - self._initial
        eta = elapsed * (self.total - self.n) / done if done > 0 and self.total >= self.n else 0.0
        post = " ".join(f"{k}={v}" for k, v in self._postfix.items())
        line = (f"{self.desc}: {self.n}/{self.total} steps ({pct}%), {elapsed:.0f} s, eta {eta:.0f} s"
                + (f", {post}" if post else ""))
        stream = sys.stdout if self._stream is None else self._stream
        print(line, file=stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str, every: Union[ProgressEvery, bool, None], initial: int = 0) -> Progress:
    """The progress of a loop of ``total`` steps, ``initial`` of them done before: ``every`` is a
    :class:`ProgressEvery`, True (its defaults) or False / None (nothing shown)."""
    if every is True:
        every = ProgressEvery()
    return Progress(total, desc, every or None, initial=initial)
