"""Write the small Fashion-MNIST subset embedded in the package (``DATASET.ROOT embedded``).

Reads the four IDX files of the full set (default: the Debian package
``dataset-fashion-mnist`` in /usr/share/datasets/fashion-mnist), picks a class-balanced
subset with a fixed seed (the same choice as ``DATASET.TRAIN_SUBSET`` / ``TEST_SUBSET``
makes on the full set), and writes gzipped IDX files plus README.md and LICENSE into
``mdistiller_blockkd/data/assets/fashion_mnist_mini/``. The output is reproducible
byte for byte (gzip mtime 0). The files are written to a temporary folder, checked
against the size limit, then moved into place.

    python -m mdistiller_blockkd make-fmnist-subset                 # 3000 train + 1000 test
    python -m mdistiller_blockkd make-fmnist-subset --train 2000 --test 500 --out /tmp/fm
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..data.common import SUBSET_SEED, balanced_subset_indices
from ..data.fashion_mnist import (
    CLASSES,
    DEFAULT_ROOT,
    EMBEDDED_DIR,
    FILES,
    load_split,
    write_idx,
)
from ..utils.fileio import atomic_write_text
from ..errors import UserError, run_cli

LICENSE_TEXT = """\
The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def _readme(n_train: int, n_test: int, seed: int, source: str, counts) -> str:
    classes = ", ".join(f"{i} {name}" for i, name in enumerate(CLASSES))
    return f"""\
# Fashion-MNIST mini (embedded subset)

A class-balanced subset of Fashion-MNIST (Zalando Research,
https://github.com/zalandoresearch/fashion-mnist) shipped with the package so that
`DATASET.TYPE fashion_mnist DATASET.ROOT embedded` runs with no download.

- train: {n_train} images from the 60000 training images ({counts['train']} per class)
- test: {n_test} images from the 10000 test images ({counts['test']} per class)
- classes: {classes}
- format: the original 28x28 uint8 IDX files, gzipped (same names as the full set)
- selection: per class, indices shuffled with numpy.random.default_rng({seed}), taken in
  turn over the classes, then sorted (the same choice DATASET.TRAIN_SUBSET /
  DATASET.TEST_SUBSET make on the full set)
- made by: `python -m mdistiller_blockkd make-fmnist-subset --train {n_train} --test {n_test} --seed {seed}`
  from {source}

Fashion-MNIST is released under the MIT License, Copyright (c) 2017 Zalando SE;
see LICENSE in this folder.
"""


def make_subset(source: str, out: str, n_train: int, n_test: int, seed: int = SUBSET_SEED, max_bytes: int = 2_000_000):
    """Write the subset into ``out``; return ``{file name: size in bytes}``."""
    if n_train < 10 or n_test < 10:
        raise UserError(f"--train {n_train} / --test {n_test}: use at least 10 images each (one per class)")
    out_dir = Path(out).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".fmnist-mini-", dir=out_dir.parent))
    try:
        counts = {}
        for split, n in (("train", n_train), ("test", n_test)):
            images, labels = load_split(source, split)
            if n > len(labels):
                raise UserError(f"--{split} {n} is more than the {len(labels)} {split} images in '{source}'")
            idx = np.asarray(balanced_subset_indices(labels, n, seed=seed), dtype=np.int64)
            chosen = np.asarray(labels, dtype=np.uint8)[idx]
            per_class = np.bincount(chosen, minlength=len(CLASSES))
            counts[split] = int(per_class.min()) if per_class.min() == per_class.max() else f"{per_class.min()}-{per_class.max()}"
            img_name, lbl_name = FILES[split]
            write_idx(str(stage / f"{img_name}.gz"), images[idx])
            write_idx(str(stage / f"{lbl_name}.gz"), chosen)
        atomic_write_text(stage / "README.md", _readme(n_train, n_test, seed, source, counts))
        atomic_write_text(stage / "LICENSE", LICENSE_TEXT)
        sizes = {p.name: p.stat().st_size for p in sorted(stage.iterdir())}
        total = sum(sizes.values())
        if total > max_bytes:
            raise UserError(
                f"the subset takes {total} bytes, over the limit of {max_bytes}; lower --train / --test"
            )
        out_dir.mkdir(exist_ok=True)
        for name in sizes:
            os.replace(stage / name, out_dir / name)
        return sizes
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=DEFAULT_ROOT, help="folder with the full set's four IDX files (default: %(default)s)")
    parser.add_argument("--out", default=EMBEDDED_DIR, help="output folder (default: the package's assets/fashion_mnist_mini)")
    parser.add_argument("--train", type=int, default=3000, help="training images to keep (default: %(default)s)")
    parser.add_argument("--test", type=int, default=1000, help="test images to keep (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SUBSET_SEED, help="seed of the class-balanced choice (default: %(default)s)")
    parser.add_argument("--max-mb", type=float, default=2.0, help="refuse output larger than this many MB (default: %(default)s)")
    args = parser.parse_args(argv)
    sizes = make_subset(args.source, args.out, args.train, args.test, args.seed, int(args.max_mb * 1_000_000))
    for name, size in sizes.items():
        print(f"{size:>10}  {os.path.join(args.out, name)}")
    print(f"{sum(sizes.values()):>10}  total")



def cli(argv=None) -> int:
    """Console-script entry point: :func:`main` with one ``error:`` line for a user error."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
