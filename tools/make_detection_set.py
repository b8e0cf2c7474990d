#!/usr/bin/env python
"""Build a small COCO-format detection set of Fashion-MNIST items on canvases.

    python tools/make_detection_set.py --out data/fmnist_det [--train 800 --val 200 --size 96 --seed 0]

See :mod:`mdistiller_blockkd.detection.make_canvas`.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistiller_blockkd.errors import run_cli  # noqa: E402


def main(argv=None):
    from mdistiller_blockkd.detection.make_canvas import main as _main

    return _main(argv)


if __name__ == "__main__":
    run_cli(main)
