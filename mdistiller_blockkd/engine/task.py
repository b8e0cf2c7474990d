"""The task interface: what the trainer asks of a kind of data, so the trainer never branches on it.

A task owns
    ``to_device(image, target, device, channels_last)`` -- a loader batch -> the distiller's inputs;
    ``step_counts(preds, target)`` -- ``(n, correct)`` of a training step (``train_acc``);
    ``evaluate(trainer, epoch)`` -- the epoch's test metrics (``test_*`` keys, summed over ranks);
    ``score_key`` -- the test metric that picks ``best`` without a validation split;
    ``summary(record, epochs)`` -- the epoch's log line;
    ``validate(trainer, epoch)`` and ``val_score_key`` -- only for data with a validation split
    (``DATASET.VAL_SPLIT``): the epoch's ``val_*`` metrics, and the one that picks ``best``.

:class:`ClassificationTask` is the image-classification task (the default);
:class:`TextTask` is text classification's (GLUE's metrics);
:class:`~mdistiller_blockkd.detection.task.DetectionTask` is detection's. A new kind of
data implements these members; the trainer needs no change. :func:`build_task` gives a
classification config's task.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.text import TEXT_TYPES, metric_names
from ..utils import console
from ..utils import dist as du
from ..utils.metrics import confusion_matrix, metrics_from_confusion
from ..utils.misc import correct_topk

__all__ = ["ClassificationTask", "TextTask", "build_task", "evaluate_model"]


class ClassificationTask:
    """Image classification: top-1 / top-5 / loss of the student, and top-1 of every extra head
    (``distiller.eval_logits``: Block-KD's stones and teacher) every ``LOG.EVAL_HEADS_FREQ`` epochs."""

    score_key = "test_acc"

    @property
    def val_score_key(self) -> str:
        """The validation metric that picks ``best`` (``score_key`` on the validation split)."""
        return "val_" + self.score_key[len("test_"):]

    def to_device(self, image, target, device, channels_last: bool = False):
        image = image.to(device, non_blocking=True)
        if channels_last and image.dim() == 4:
            image = image.contiguous(memory_format=torch.channels_last)
        return image, target.to(device, non_blocking=True)

    def step_counts(self, preds, target):
        return int(target.shape[0]), (preds.detach().argmax(dim=1) == target).sum()

    def evaluate(self, trainer, epoch=None) -> Dict[str, float]:
        freq = int(trainer.cfg.LOG.EVAL_HEADS_FREQ)
        heads = freq > 0 and (epoch is None or epoch == trainer.epochs or epoch % freq == 0)
        return self._scores(trainer, trainer.val_loader, heads, f"eval {epoch}" if epoch is not None else "eval")

    def validate(self, trainer, epoch=None) -> Dict[str, float]:
        """The student's metrics on the validation split (``trainer.holdout_loader``) as ``val_*``."""
        scores = self._scores(trainer, trainer.holdout_loader, False, f"val {epoch}")
        return {k.replace("test_", "val_", 1): v for k, v in scores.items()}

    def _scores(self, trainer, loader, heads: bool, desc: str) -> Dict[str, float]:
        return evaluate_model(trainer.distiller, loader, trainer.device, amp_dtype=trainer.amp_dtype,
                              channels_last=trainer.channels_last, heads=heads, progress=trainer.progress, desc=desc)

    def summary(self, record: dict, epochs: int) -> str:
        heads = " ".join(f"{k}={v:.2f}" for k, v in record.items() if k.startswith("acc_"))
        if "val_acc" in record:
            heads = f"val top-1 {record['val_acc']:.2f}" + (" | " + heads if heads else "")
        return (f"epoch {record['epoch']}/{epochs} lr {record['lr']:.4g} | train loss {record['train_loss']:.4f} "
                f"acc {record['train_acc']:.2f} | test loss {record['test_loss']:.4f} top-1 {record['test_acc']:.2f} "
                f"top-5 {record['test_acc_top5']:.2f}{' | ' + heads if heads else ''} | best {record['best_acc']:.2f} | "
                f"{record['epoch_time_s']:.1f}s, {record['ms_per_step']:.1f} ms/step")


class TextTask(ClassificationTask):
    """Text classification (``DATASET.TYPE glue`` / ``tsv``): GLUE's metrics of the student.

    ``metrics`` are names of :data:`mdistiller_blockkd.utils.metrics.METRICS`, the first
    one picks ``best`` (:func:`mdistiller_blockkd.data.text.metric_names`: CoLA ``mcc``,
    MRPC and QQP ``f1``, else ``acc``). The records hold ``test_<metric>`` for each (from the
    confusion matrix summed over ranks), ``test_acc`` and ``test_loss``, the stones' and the
    teacher's ``acc_<head>``, and the same ``val_*`` on a validation split. Batches are the
    packed ``(B, 3, L)`` token tensors of :mod:`mdistiller_blockkd.utils.text_batch`, moved
    like images.
    """

    def __init__(self, metrics: Sequence[str], num_classes: int):
        self.metrics = tuple(metrics)
        self.num_classes = int(num_classes)
        self.score_key = f"test_{self.metrics[0]}"

    def _scores(self, trainer, loader, heads: bool, desc: str) -> Dict[str, float]:
        out = evaluate_model(trainer.distiller, loader, trainer.device, amp_dtype=trainer.amp_dtype, heads=heads,
                             progress=trainer.progress, desc=desc, metrics=self.metrics, num_classes=self.num_classes)
        out.pop("test_acc_top5")  # meaningless for two or three classes; the metrics say what counts
        return out

    def summary(self, record: dict, epochs: int) -> str:
        def scores(prefix):
            return " ".join(f"{m} {record[f'{prefix}_{m}']:.2f}" for m in self.metrics)

        heads = " ".join(f"{k}={v:.2f}" for k, v in record.items() if k.startswith("acc_"))
        if f"val_{self.metrics[0]}" in record:
            heads = f"val {scores('val')}" + (" | " + heads if heads else "")
        return (f"epoch {record['epoch']}/{epochs} lr {record['lr']:.4g} | train loss {record['train_loss']:.4f} "
                f"acc {record['train_acc']:.2f} | test loss {record['test_loss']:.4f} {scores('test')}"
                f"{' | ' + heads if heads else ''} | best {self.metrics[0]} {record['best_acc']:.2f} | "
                f"{record['epoch_time_s']:.1f}s, {record['ms_per_step']:.1f} ms/step")


def build_task(cfg, num_classes: int) -> ClassificationTask:
    """The task of a classification config: :class:`TextTask` for text data, else :class:`ClassificationTask`."""
    if str(cfg.DATASET.TYPE).strip().lower() in TEXT_TYPES:
        return TextTask(metric_names(cfg), num_classes)
    return ClassificationTask()


@torch.no_grad()
def evaluate_model(distiller: nn.Module, loader, device, amp_dtype=None, channels_last: bool = False,
                   progress: console.ProgressEvery | bool | None = False, desc: str = "eval",
                   heads: bool = True, metrics: Sequence[str] = (), num_classes: Optional[int] = None
                   ) -> Dict[str, float]:
    """Evaluate ``distiller`` (its ``forward_test`` and ``eval_logits``) on ``loader``.

    Returns ``test_acc``, ``test_acc_top5`` (percent), ``test_loss`` (mean cross-entropy)
    and ``acc_<head>`` for every head of ``eval_logits`` (unless ``heads`` is False), summed
    over all processes; with ``metrics`` (names of :data:`mdistiller_blockkd.utils.metrics.METRICS`)
    and ``num_classes`` also ``test_<metric>`` of the student from its summed confusion matrix.
    The distiller is left in eval mode. ``progress``: see :func:`~mdistiller_blockkd.utils.console.progress`.
    """
    device = torch.device(device)
    distiller.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    c1 = torch.zeros((), dtype=torch.int64, device=device)
    c5 = torch.zeros((), dtype=torch.int64, device=device)
    k = int(num_classes) if metrics else 0
    cm = torch.zeros((k, k), dtype=torch.int64, device=device)
    score_heads = heads
    heads: Dict[str, torch.Tensor] = {}
    n = 0
    bar = console.progress(len(loader), desc, progress)
    try:
        for image, target in loader:
            image = image.to(device, non_blocking=True)
            if channels_last and image.dim() == 4:
                image = image.contiguous(memory_format=torch.channels_last)
            target = target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = distiller.forward_test(image)
                extra = distiller.eval_logits(image) if score_heads else {}
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
            top1, top5 = correct_topk(logits, target, (1, 5))
            c1 += top1
            c5 += top5
            if k:
                cm += confusion_matrix(logits.argmax(dim=1), target, k)
            for name, z in extra.items():
                hit = correct_topk(z.float(), target, (1,))[0]
                heads[name] = heads[name] + hit if name in heads else hit
            n += int(target.shape[0])
            bar.update(1)
    finally:
        bar.close()
    names = list(heads)
    vec = torch.stack([loss_sum, c1.double(), c5.double(), torch.tensor(float(n), dtype=torch.float64, device=device)]
                      + [heads[h].double() for h in names] + list(cm.flatten().double()))
    vec = du.all_reduce_sum(vec).cpu().tolist()
    total = max(vec[3], 1.0)
    out = {"test_acc": 100.0 * vec[1] / total, "test_acc_top5": 100.0 * vec[2] / total, "test_loss": vec[0] / total}
    for h, v in zip(names, vec[4:4 + len(names)]):
        out[f"acc_{h}"] = 100.0 * v / total
    if k:
        summed = torch.tensor(vec[4 + len(names):], dtype=torch.float64).round().long().reshape(k, k)
        out.update({f"test_{m}": v for m, v in metrics_from_confusion(summed, metrics).items()})
    return out
