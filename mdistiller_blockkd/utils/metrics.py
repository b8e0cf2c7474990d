"""Classification metrics from a confusion matrix: accuracy, F1, Matthews correlation (GLUE's).

Every metric is computed from the ``(C, C)`` confusion matrix (rows: true class,
columns: predicted class), so per-process matrices summed over DDP ranks give exact
whole-set values. Values are percentages (x 100), like the toolbox's accuracies.

* :func:`confusion_matrix` -- counts from predictions and targets;
* :func:`accuracy` -- correct / all;
* :func:`binary_f1` -- F1 of the positive class (GLUE's MRPC and QQP: class 1);
* :func:`matthews_corrcoef` -- Matthews correlation (GLUE's CoLA); for more than two
  classes Gorodkin's R_K, as scikit-learn computes it; 0 when a marginal is constant;
* :data:`METRICS` / :func:`metrics_from_confusion` -- by name: ``acc``, ``f1``, ``mcc``.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import torch
from torch import Tensor

__all__ = ["confusion_matrix", "accuracy", "binary_f1", "matthews_corrcoef", "METRICS", "metrics_from_confusion"]


def confusion_matrix(preds: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """``(num_classes, num_classes)`` int64 counts: ``[true, predicted]``."""
    idx = targets.long().flatten() * num_classes + preds.long().flatten()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _counts(cm: Tensor):
    return [[int(v) for v in row] for row in cm.detach().cpu().tolist()]


def accuracy(cm: Tensor) -> float:
    c = _counts(cm)
    total = sum(map(sum, c))
    return 100.0 * sum(c[i][i] for i in range(len(c))) / total if total else 0.0


def binary_f1(cm: Tensor, positive: int = 1) -> float:
    """F1 of class ``positive``: ``2 TP / (2 TP + FP + FN)`` (0 when there is no positive at all)."""
    c = _counts(cm)
    tp = c[positive][positive]
    fp = sum(row[positive] for row in c) - tp
    fn = sum(c[positive]) - tp
    den = 2 * tp + fp + fn
    return 100.0 * 2 * tp / den if den else 0.0


def matthews_corrcoef(cm: Tensor) -> float:
    """Matthews correlation x 100 (binary MCC; Gorodkin's R_K for more classes)."""
    c = _counts(cm)
    k = len(c)
    t = [sum(c[i]) for i in range(k)]  # true counts
    p = [sum(c[i][j] for i in range(k)) for j in range(k)]  # predicted counts
    n = sum(t)
    correct = sum(c[i][i] for i in range(k))
    cov_tp = correct * n - sum(a * b for a, b in zip(t, p))
    cov_pp = n * n - sum(b * b for b in p)
    cov_tt = n * n - sum(a * a for a in t)
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return 100.0 * cov_tp / math.sqrt(cov_tt * cov_pp)


#: Metric name -> function of the confusion matrix.
METRICS = {"acc": accuracy, "f1": binary_f1, "mcc": matthews_corrcoef}


def metrics_from_confusion(cm: Tensor, names: Sequence[str]) -> Dict[str, float]:
    """``{name: value}`` for each metric name in ``names`` (keys of :data:`METRICS`)."""
    return {name: METRICS[name](cm) for name in names}
