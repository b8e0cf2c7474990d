"""COCO box mAP with pycocotools: AP, AP50, AP75, APs, APm, APl.

:func:`coco_metrics` scores a list of detections (COCO result format) against an
instances file; :func:`evaluate_detector` runs a detector over a loader, gathers the
detections of every process (exact: the validation sampler shards without padding or
repetition) and scores them. Values are percentages (COCOeval's ``stats[0:6]`` x 100);
a size range without any ground-truth box gives COCO's ``-1`` (e.g. ``APl`` on a set of
small objects). No detection at all gives 0 for every metric.
"""

from __future__ import annotations

import contextlib
import io
from typing import Dict, List, Optional, Sequence

import torch

from ..utils import console
from ..utils import dist as du

__all__ = ["METRICS", "coco_metrics", "detections_to_coco", "evaluate_detector"]

#: The six metrics, in COCOeval's ``stats`` order.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

_GT_CACHE: Dict[str, object] = {}


def require_pycocotools():
    """pycocotools' ``(COCO, COCOeval)``, or a :class:`UserError` saying how to install it."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        from ..errors import UserError

        raise UserError("detection evaluation needs pycocotools, which is not installed; "
                        "pip install 'mdistiller_blockkd[detection]' (or: pip install pycocotools)") from None
    return COCO, COCOeval


def _coco_gt(ann_file: str):
    COCO, _ = require_pycocotools()

    if ann_file not in _GT_CACHE:
        with contextlib.redirect_stdout(io.StringIO()):
            _GT_CACHE[ann_file] = COCO(ann_file)
    return _GT_CACHE[ann_file]


def coco_metrics(ann_file: str, detections: List[dict], image_ids: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` (percent) of ``detections`` on ``ann_file``.

    ``detections``: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``;
    ``image_ids``: the images scored (default all of the file's).
    """
    _, COCOeval = require_pycocotools()
    gt = _coco_gt(ann_file)
    ids = sorted(int(i) for i in (image_ids if image_ids is not None else gt.getImgIds()))
    if not detections:
        return {k: 0.0 for k in METRICS}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(list(detections))
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (100.0 * float(v) if v >= 0 else -1.0) for k, v in zip(METRICS, ev.stats[:6])}


def detections_to_coco(outputs: List[dict], targets: List[dict], label_to_cat: Dict[int, int]) -> List[dict]:
    """torchvision detections (``boxes`` x1y1x2y2, ``labels``, ``scores``) -> COCO result dicts."""
    res = []
    for out, tgt in zip(outputs, targets):
        boxes = out["boxes"].detach().float().cpu()
        if boxes.numel():
            boxes[:, 2:] -= boxes[:, :2]
        for b, lab, sc in zip(boxes.tolist(), out["labels"].tolist(), out["scores"].float().cpu().tolist()):
            res.append({"image_id": int(tgt["image_id"]), "category_id": int(label_to_cat[int(lab)]),
                        "bbox": [round(v, 3) for v in b], "score": round(float(sc), 5)})
    return res


@torch.no_grad()
def evaluate_detector(forward, loader, dataset, device, amp_dtype=None,
                      progress: console.ProgressEvery | bool | None = False, desc: str = "eval") -> Dict[str, float]:
    """COCO metrics of ``forward(list of images) -> detections`` over ``loader``.

    ``dataset`` is the :class:`~.data.CocoDetection` the loader reads (its ``ann_file``,
    ``label_to_cat`` and ``ids``). Every process gathers every process's detections and
    scores the whole set, so all ranks return the same numbers.
    """
    device = torch.device(device)
    dets: List[dict] = []
    bar = console.progress(len(loader), desc, progress)
    try:
        for images, targets in loader:
            images = [im.to(device, non_blocking=True) for im in images]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = forward(images)
            dets += detections_to_coco(outputs, targets, dataset.label_to_cat)
            bar.update(1)
    finally:
        bar.close()
    if du.is_dist():
        dets = [d for part in du.all_gather_object(dets) for d in part]
    return coco_metrics(dataset.ann_file, dets, dataset.ids)
