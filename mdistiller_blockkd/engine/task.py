"""The task interface: what the trainer asks of a kind of data, so the trainer never branches on it.

A task owns
    ``to_device(image, target, device, channels_last)`` -- a loader batch -> the distiller's inputs;
    ``step_counts(preds, target)`` -- ``(n, correct)`` of a training step (``train_acc``);
    ``evaluate(trainer, epoch)`` -- the epoch's test metrics (``test_*`` keys, summed over ranks);
    ``score_key`` -- the test metric that picks ``best`` without a validation split;
    ``summary(record, epochs)`` -- the epoch's log line.

:class:`ClassificationTask` is the image-classification task (the default);
:class:`~mdistiller_blockkd.detection.task.DetectionTask` is detection's. A new kind of
data implements these five members; the trainer needs no change.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import console
from ..utils import dist as du
from ..utils.misc import correct_topk

__all__ = ["ClassificationTask", "evaluate_model"]


class ClassificationTask:
    """Image classification: top-1 / top-5 / loss of the student, and top-1 of every extra head
    (``distiller.eval_logits``: Block-KD's stones and teacher) every ``LOG.EVAL_HEADS_FREQ`` epochs."""

    score_key = "test_acc"

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
        return evaluate_model(trainer.distiller, trainer.val_loader, trainer.device, amp_dtype=trainer.amp_dtype,
                              channels_last=trainer.channels_last, heads=heads, progress=trainer.progress,
                              desc=f"eval {epoch}" if epoch is not None else "eval")

    def summary(self, record: dict, epochs: int) -> str:
        heads = " ".join(f"{k}={v:.2f}" for k, v in record.items() if k.startswith("acc_"))
        if "val_acc" in record:
            heads = f"val top-1 {record['val_acc']:.2f}" + (" | " + heads if heads else "")
        return (f"epoch {record['epoch']}/{epochs} lr {record['lr']:.4g} | train loss {record['train_loss']:.4f} "
                f"acc {record['train_acc']:.2f} | test loss {record['test_loss']:.4f} top-1 {record['test_acc']:.2f} "
                f"top-5 {record['test_acc_top5']:.2f}{' | ' + heads if heads else ''} | best {record['best_acc']:.2f} | "
                f"{record['epoch_time_s']:.1f}s, {record['ms_per_step']:.1f} ms/step")


@torch.no_grad()
def evaluate_model(distiller: nn.Module, loader, device, amp_dtype=None, channels_last: bool = False,
                   progress: console.ProgressEvery | bool | None = False, desc: str = "eval",
                   heads: bool = True) -> Dict[str, float]:
    """Evaluate ``distiller`` (its ``forward_test`` and ``eval_logits``) on ``loader``.

    Returns ``test_acc``, ``test_acc_top5`` (percent), ``test_loss`` (mean cross-entropy)
    and ``acc_<head>`` for every head of ``eval_logits`` (unless ``heads`` is False), summed
    over all processes. The distiller is left in eval mode. ``progress``: see
    :func:`~mdistiller_blockkd.utils.console.progress`.
    """
    device = torch.device(device)
    distiller.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    c1 = torch.zeros((), dtype=torch.int64, device=device)
    c5 = torch.zeros((), dtype=torch.int64, device=device)
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
            for name, z in extra.items():
                hit = correct_topk(z.float(), target, (1,))[0]
                heads[name] = heads[name] + hit if name in heads else hit
            n += int(target.shape[0])
            bar.update(1)
    finally:
        bar.close()
    names = list(heads)
    vec = torch.stack([loss_sum, c1.double(), c5.double(), torch.tensor(float(n), dtype=torch.float64, device=device)]
                      + [heads[k].double() for k in names])
    vec = du.all_reduce_sum(vec).cpu().tolist()
    total = max(vec[3], 1.0)
    out = {"test_acc": 100.0 * vec[1] / total, "test_acc_top5": 100.0 * vec[2] / total, "test_loss": vec[0] / total}
    for k, v in zip(names, vec[4:]):
        out[f"acc_{k}"] = 100.0 * v / total
    return out
