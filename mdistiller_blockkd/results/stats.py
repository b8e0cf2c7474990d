"""Seed statistics and run records: mean ± std, Welch's standard error, ``metrics.jsonl``."""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

from ..utils.fileio import read_json_lines

__all__ = ["mean_std", "welch", "read_metrics"]


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


def welch(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
    """``(mean(a) - mean(b), Welch's standard error of that difference)``; the error is 0 with one value per side."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    return ma - mb, math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))


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
