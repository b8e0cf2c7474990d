"""COCO-format detection data: images plus an instances JSON in the COCO 2017 layout.

Layout under ``DATASET.ROOT`` (as COCO 2017 unpacks)::

    <root>/annotations/instances_train2017.json
    <root>/annotations/instances_val2017.json
    <root>/train2017/<file_name>
    <root>/val2017/<file_name>

(``DETECTION.TRAIN_SET`` / ``TEST_SET`` rename ``train2017`` / ``val2017``; COCO's val2017 is
the set every epoch is scored on, as in the papers.)

Items are ``(image, target)``: ``image`` a float ``3 x H x W`` tensor in ``[0, 1]`` at the
file's own size (the detector's transform resizes and normalises), ``target`` a dict
with ``boxes`` (``N x 4`` float, ``x1, y1, x2, y2`` pixels), ``labels`` (``N`` int64,
1-based: 0 is background), ``image_id`` (the COCO id) and ``orig_size``. Batches are
lists (:func:`collate`): images differ in size.

Labels
    The categories of the JSON, sorted by id, get labels ``1..K`` (``num_classes = K + 1``).
    With ``DETECTION.CATEGORY_IDS_AS_LABELS`` the label is the category id itself
    (``num_classes = max id + 1``), the convention of torchvision's COCO weights
    (91 slots for COCO's 80 categories).

Bad inputs (documented handling; every error is one :class:`DatasetError` line)
    * missing root, annotation file or image file: error naming the path and the layout;
    * malformed JSON or an annotation of an unknown category / image: error;
    * a box reaching outside its image: clipped to the image, counted, and reported
      in one warning line per split (``DETECTION.BOX_OUTSIDE clip``); with
      ``BOX_OUTSIDE error`` the first such box is an error;
    * a box with no area (``w <= 0`` or ``h <= 0``, also after clipping): dropped and
      counted in the same warning;
    * ``iscrowd`` annotations: not trained on (torchvision's convention); COCOeval
      treats them as "ignore" regions;
    * an image without boxes: kept as a negative example (torchvision trains its RPN
      and ROI heads with background-only targets), counted in the description.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DatasetError

__all__ = ["CocoDetection", "collate", "annotation_path", "image_dir", "BOX_OUTSIDE_MODES"]

BOX_OUTSIDE_MODES = ("clip", "error")


def annotation_path(root: str, split: str) -> str:
    """``<root>/annotations/instances_<split>.json``."""
    return os.path.join(root, "annotations", f"instances_{split}.json")


def image_dir(root: str, split: str) -> str:
    """``<root>/<split>``."""
    return os.path.join(root, split)


def _load_json(path: str, root: str, split: str) -> dict:
    if not os.path.isdir(root):
        raise DatasetError(
            f"detection dataset root '{root}' (DATASET.ROOT) not found; point DATASET.ROOT at a folder in the COCO "
            "2017 layout (annotations/instances_train2017.json, train2017/, ...) or build the small set with "
            "'python tools/make_detection_set.py --out <folder>'")
    if not os.path.isfile(path):
        raise DatasetError(
            f"annotation file '{path}' not found; the {split} split needs annotations/instances_{split}.json under "
            f"DATASET.ROOT '{root}' (COCO 2017 layout)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"annotation file '{path}' is not valid JSON ({' '.join(str(e).split())[:150]}); "
                           "re-create it") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DatasetError(f"annotation file '{path}' has no '{key}' list; expected a COCO instances file "
                               "with images, annotations and categories")
    return data


def _field(path: str, what: str, entry, key: str, kind: type, low: Optional[int] = None):
    """``entry[key]`` of a COCO ``what`` (image, annotation, category) entry, checked to be a
    ``kind`` (an int is never a bool) of at least ``low``; else one :class:`DatasetError` line."""
    plural = {"category": "categories"}.get(what, what + "s")
    if not isinstance(entry, dict):
        raise DatasetError(f"'{path}': an entry of '{plural}' is {' '.join(repr(entry).split())[:80]}, not an object "
                           "with fields; expected a COCO instances file")
    value = entry.get(key)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)) and (low is None or value >= low):
        return value
    name = f"{what} {entry['id']!r}" if isinstance(entry.get("id"), (int, str)) else f"an entry of '{plural}'"
    want = {int: "a whole number", str: "a text value"}[kind] + (f" >= {low}" if low is not None else "")
    found = "missing" if key not in entry else f"{' '.join(repr(value).split())[:60]}"
    raise DatasetError(f"'{path}': {name} has '{key}' {found}; it must be {want} (COCO instances format)")


class CocoDetection(Dataset):
    """A COCO-format split (see the module docstring).

    ``root``: the dataset folder; ``split``: e.g. ``train2017``; ``train``: random
    horizontal flips (p = 0.5, drawn from torch's global RNG, so a resumed run redraws
    the same flips); ``subset`` > 0 keeps the first ``subset`` images by id;
    ``category_ids_as_labels``: see Labels; ``box_outside``: ``clip`` or ``error``;
    ``check_files``: verify that every image file exists (fail fast, before training).

    Attributes: ``ann_file``, ``img_dir``, ``categories`` (the JSON's list, sorted by id),
    ``label_to_cat`` (label -> category id), ``num_classes`` (background included),
    ``ids`` (the kept image ids), ``stats`` (counts of clipped and dropped boxes and
    of images without boxes).
    """

    def __init__(self, root: str, split: str, train: bool = False, subset: int = 0,
                 category_ids_as_labels: bool = False, box_outside: str = "clip", check_files: bool = True):
        if box_outside not in BOX_OUTSIDE_MODES:
            raise ConfigError(f"DETECTION.BOX_OUTSIDE is '{box_outside}'; use clip or error")
        self.root, self.split, self.train = root, split, bool(train)
        self.ann_file, self.img_dir = annotation_path(root, split), image_dir(root, split)
        data = _load_json(self.ann_file, root, split)
        if not os.path.isdir(self.img_dir):
            raise DatasetError(f"image folder '{self.img_dir}' not found; the {split} images go there (COCO 2017 layout)")
        for c in data["categories"]:
            _field(self.ann_file, "category", c, "id", int)
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        if not self.categories:
            raise DatasetError(f"annotation file '{self.ann_file}' lists no categories")
        cat_ids = [c["id"] for c in self.categories]
        if len(set(cat_ids)) != len(cat_ids):
            dup = next(i for i in cat_ids if cat_ids.count(i) > 1)
            raise DatasetError(f"'{self.ann_file}': category id {dup} is listed twice in 'categories'; give each "
                               "category one entry")
        if category_ids_as_labels:
            if min(cat_ids) < 1:
                raise DatasetError(f"'{self.ann_file}': category id {min(cat_ids)} < 1 cannot be a label "
                                   "(0 is background); set DETECTION.CATEGORY_IDS_AS_LABELS False")
            self.cat_to_label = {c: c for c in cat_ids}
            self.num_classes = max(cat_ids) + 1
        else:
            self.cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
            self.num_classes = len(cat_ids) + 1
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        images = {}
        for im in data["images"]:
            iid = _field(self.ann_file, "image", im, "id", int)
            images[iid] = (_field(self.ann_file, "image", im, "file_name", str),
                           _field(self.ann_file, "image", im, "width", int, low=1),
                           _field(self.ann_file, "image", im, "height", int, low=1))
        per_image: Dict[int, List[dict]] = {i: [] for i in images}
        for a in data["annotations"]:
            iid = _field(self.ann_file, "annotation", a, "image_id", int)
            cid = _field(self.ann_file, "annotation", a, "category_id", int)
            if iid not in images:
                raise DatasetError(f"'{self.ann_file}': annotation {a.get('id')} refers to image id {iid}, which is "
                                   "not in 'images'")
            if cid not in self.cat_to_label:
                raise DatasetError(f"'{self.ann_file}': annotation {a.get('id')} has category_id {cid}, which is not "
                                   f"in 'categories' (ids {cat_ids[:10]}{'...' if len(cat_ids) > 10 else ''})")
            per_image[iid].append(a)
        self.ids = sorted(images)
        if subset and subset > 0:
            self.ids = self.ids[: int(subset)]
        if not self.ids:
            raise DatasetError(f"'{self.ann_file}' lists no images")
        self.stats = {"clipped": 0, "dropped": 0, "crowd": 0, "empty_images": 0, "boxes": 0}
        self.items: List[Tuple[int, str, int, int, np.ndarray, np.ndarray]] = []
        for iid in self.ids:
            fname, w, h = images[iid]
            path = os.path.join(self.img_dir, fname)
            if check_files and not os.path.isfile(path):
                raise DatasetError(f"image file '{path}' (image id {iid} of '{self.ann_file}') not found")
            boxes, labels = [], []
            for a in per_image[iid]:
                if a.get("iscrowd", 0) not in (0, 1):  # bools are 0 and 1 too
                    raise DatasetError(f"'{self.ann_file}': annotation {a.get('id')} has iscrowd {a['iscrowd']!r}; "
                                       "use 0 or 1")
                if a.get("iscrowd", 0):
                    self.stats["crowd"] += 1
                    continue
                bbox = a.get("bbox")
                if not (isinstance(bbox, list) and len(bbox) == 4 and all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
                    raise DatasetError(f"'{self.ann_file}': annotation {a.get('id')} has bbox "
                                       f"{' '.join(repr(bbox).split())[:80]}; expected [x, y, width, height], four "
                                       "finite numbers (pixels)")
                x, y, bw, bh = (float(v) for v in bbox)
                x1, y1, x2, y2 = x, y, x + bw, y + bh
                if bw > 0 and bh > 0 and (x1 < 0 or y1 < 0 or x2 > w or y2 > h):
                    if box_outside == "error":
                        raise DatasetError(
                            f"'{self.ann_file}': annotation {a.get('id')} box {[x, y, bw, bh]} reaches outside its "
                            f"{w}x{h} image {fname}; fix the annotation or set DETECTION.BOX_OUTSIDE clip")
                    self.stats["clipped"] += 1
                    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
                if x2 - x1 <= 0 or y2 - y1 <= 0:
                    self.stats["dropped"] += 1
                    continue
                boxes.append([x1, y1, x2, y2])
                labels.append(self.cat_to_label[a["category_id"]])
            if not boxes:
                self.stats["empty_images"] += 1
            self.stats["boxes"] += len(boxes)
            self.items.append((iid, path, w, h, np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                               np.asarray(labels, dtype=np.int64)))
        if self.stats["clipped"] or self.stats["dropped"]:
            warnings.warn(f"{self.ann_file}: {self.stats['clipped']} box(es) reaching outside their image were clipped, "
                          f"{self.stats['dropped']} box(es) without area were dropped", stacklevel=2)

    def __len__(self) -> int:
        return len(self.items)

    def describe(self) -> str:
        """``'<n> images, <b> boxes, <e> without boxes (kept as negatives)'``."""
        s = self.stats
        return f"{len(self)} images, {s['boxes']} boxes, {s['empty_images']} without boxes (kept as negatives)"

    def __getitem__(self, index: int):
        from PIL import Image

        iid, path, w, h, boxes, labels = self.items[index]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except OSError as e:
            raise DatasetError(f"cannot read image '{path}' ({e})") from None
        if arr.shape[0] != h or arr.shape[1] != w:
            raise DatasetError(f"image '{path}' is {arr.shape[1]}x{arr.shape[0]} but '{self.ann_file}' says {w}x{h}")
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        boxes_t = torch.from_numpy(boxes.copy())
        if self.train and float(torch.rand(())) < 0.5:
            image = image.flip(-1)
            if boxes_t.numel():
                boxes_t = torch.stack([w - boxes_t[:, 2], boxes_t[:, 1], w - boxes_t[:, 0], boxes_t[:, 3]], dim=1)
        target = {"boxes": boxes_t, "labels": torch.from_numpy(labels.copy()), "image_id": iid,
                  "orig_size": (h, w)}
        return image, target


def collate(batch: Sequence[tuple]):
    """``[(image, target), ...]`` -> ``(list of images, list of targets)``."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def targets_to(targets: List[dict], device) -> List[dict]:
    """Move the tensors of each target dict to ``device``."""
    return [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]


def category_names(dataset: CocoDetection) -> Dict[int, str]:
    """label -> category name."""
    return {dataset.cat_to_label[int(c["id"])]: str(c.get("name", c["id"])) for c in dataset.categories}


def build_detection_datasets(cfg) -> Tuple[CocoDetection, CocoDetection, int]:
    """``(train_set, val_set, num_classes)`` from ``cfg.DATASET`` and ``cfg.DETECTION``.

    The two splits must list the same categories (else :class:`DatasetError`).
    """
    root = os.path.expanduser(str(cfg.DATASET.ROOT or "./data/coco"))
    d = cfg.DETECTION
    kw = dict(category_ids_as_labels=bool(d.CATEGORY_IDS_AS_LABELS), box_outside=str(d.BOX_OUTSIDE).lower())
    train = CocoDetection(root, str(d.TRAIN_SET), train=True, subset=int(cfg.DATASET.TRAIN_SUBSET), **kw)
    val = CocoDetection(root, str(d.TEST_SET), train=False, subset=int(cfg.DATASET.TEST_SUBSET), **kw)
    if train.cat_to_label != val.cat_to_label:
        raise DatasetError(f"'{train.ann_file}' and '{val.ann_file}' list different categories; both splits need "
                           "the same 'categories'")
    return train, val, train.num_classes


def describe_detection_data(cfg, train: CocoDetection, val: CocoDetection) -> str:
    """One line for logs."""
    return (f"coco from {train.root}: train {train.describe()}; val {val.describe()}; "
            f"{train.num_classes - 1} categories (+ background)")

