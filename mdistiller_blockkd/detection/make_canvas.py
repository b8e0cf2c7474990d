"""Build a small real-image detection set in COCO format: Fashion-MNIST items on canvases.

Each canvas is ``--size`` x ``--size`` RGB, dark with mild noise, holding 1..``--max-objects``
real Fashion-MNIST items (train items for ``train2017``, test items for ``val2017``: no
item appears in both splits), each resized to a random side in ``[--min-scale,
--max-scale]`` pixels, tinted with a random colour and pasted at a random position so
that boxes overlap by at most IoU 0.3. The box of an item is tight to its nonzero
pixels after resizing; its category is the Fashion-MNIST class (ids 1..10, names as in
the dataset). Output, in the COCO 2017 layout::

    <out>/train2017/000000000001.png ...
    <out>/val2017/...
    <out>/annotations/instances_train2017.json
    <out>/annotations/instances_val2017.json

Deterministic given ``--seed`` (numpy ``default_rng``), the source files and Pillow's
resampling. Source: ``--source`` is a folder of Fashion-MNIST IDX files (default: the
Debian package's ``/usr/share/datasets/fashion-mnist``; ``embedded`` = the subset shipped
with the package).

    python tools/make_detection_set.py --out data/fmnist_det --train 800 --val 200
"""

from __future__ import annotations

import argparse
import json
import os
from typing import List, Optional, Sequence

import numpy as np

from ..data import fashion_mnist as fm
from ..utils.fileio import atomic_write_text
from ..errors import ConfigError

__all__ = ["make_split", "make_detection_set", "main"]


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def make_split(items: np.ndarray, labels: Sequence[int], n_images: int, out_dir: str, size: int, rng,
               max_objects: int = 4, min_scale: int = 20, max_scale: int = 48, first_image_id: int = 1):
    """Write ``n_images`` canvases into ``out_dir``; return the COCO ``(images, annotations)`` lists."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    images, anns = [], []
    ann_id = 1
    for k in range(n_images):
        iid = first_image_id + k
        canvas = rng.normal(12.0, 6.0, size=(size, size, 3)).clip(0, 255)
        boxes: List[list] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            for _attempt in range(20):
                idx = int(rng.integers(len(items)))
                side = int(rng.integers(min_scale, max_scale + 1))
                item = np.asarray(Image.fromarray(items[idx]).resize((side, side), Image.BILINEAR), dtype=np.float64)
                ys, xs = np.nonzero(item > 0)
                if len(xs) == 0:
                    continue
                x0, y0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
                box = [x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1]
                if any(_iou(box, b) > 0.3 for b in boxes):
                    continue
                tint = rng.uniform(0.5, 1.0, size=3)
                patch = canvas[y0:y0 + side, x0:x0 + side]
                np.maximum(patch, item[:, :, None] * tint[None, None, :], out=patch)
                boxes.append(box)
                anns.append({"id": ann_id, "image_id": iid, "category_id": int(labels[idx]) + 1,
                             "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                             "area": float((box[2] - box[0]) * (box[3] - box[1])), "iscrowd": 0})
                ann_id += 1
                break
        name = f"{iid:012d}.png"
        Image.fromarray(canvas.round().astype(np.uint8)).save(os.path.join(out_dir, name), optimize=False)
        images.append({"id": iid, "file_name": name, "width": size, "height": size})
    return images, anns


def make_detection_set(out: str, n_train: int = 800, n_val: int = 200, size: int = 96, seed: int = 0,
                       source: Optional[str] = None, max_objects: int = 4, min_scale: int = 20,
                       max_scale: int = 48) -> dict:
    """Write the whole set under ``out``; return ``{split: (n_images, n_boxes)}``."""
    if not (1 <= min_scale <= max_scale <= size):
        raise ConfigError(f"need 1 <= --min-scale ({min_scale}) <= --max-scale ({max_scale}) <= --size ({size})")
    if n_train < 1 or n_val < 1 or max_objects < 1:
        raise ConfigError("--train, --val and --max-objects must be >= 1")
    root = fm.DEFAULT_ROOT if not source else (fm.EMBEDDED_DIR if source == fm.EMBEDDED else os.path.expanduser(source))
    rng = np.random.default_rng(seed)
    cats = [{"id": i + 1, "name": n, "supercategory": "fashion"} for i, n in enumerate(fm.CLASSES)]
    out_stats = {}
    for split, src, n in (("train2017", "train", n_train), ("val2017", "test", n_val)):
        items, labels = fm.load_split(root, src)
        images, anns = make_split(items, labels, n, os.path.join(out, split), size, rng, max_objects,
                                  min_scale, max_scale)
        blob = {"info": {"description": f"Fashion-MNIST items on {size}x{size} canvases (seed {seed}, "
                                        f"source {root}, {src} split)"},
                "licenses": [], "images": images, "annotations": anns, "categories": cats}
        os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
        atomic_write_text(os.path.join(out, "annotations", f"instances_{split}.json"), json.dumps(blob))
        out_stats[split] = (len(images), len(anns))
    return out_stats


def main(argv=None):
    """Command line: see the module docstring (``--help``)."""
    p = argparse.ArgumentParser(description="Build a COCO-format detection set of Fashion-MNIST items on canvases.")
    p.add_argument("--out", required=True, help="output folder (COCO 2017 layout)")
    p.add_argument("--train", type=int, default=800, help="training images (default 800)")
    p.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    p.add_argument("--size", type=int, default=96, help="canvas side in pixels (default 96)")
    p.add_argument("--max-objects", type=int, default=4, help="items per canvas: 1..this (default 4)")
    p.add_argument("--min-scale", type=int, default=20, help="smallest item side in pixels (default 20)")
    p.add_argument("--max-scale", type=int, default=48, help="largest item side in pixels (default 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default="", help="Fashion-MNIST IDX folder; '' = /usr/share/datasets/fashion-mnist, "
                                                "'embedded' = the subset shipped with the package")
    a = p.parse_args(argv)
    stats = make_detection_set(a.out, a.train, a.val, a.size, a.seed, a.source or None, a.max_objects,
                               a.min_scale, a.max_scale)
    for split, (n, b) in stats.items():
        print(f"{split}: {n} images, {b} boxes -> {os.path.join(a.out, split)}")
    return stats
