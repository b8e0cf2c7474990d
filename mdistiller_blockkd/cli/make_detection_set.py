"""The make-detection-set command: a small COCO-format detection set of Fashion-MNIST items on canvases.

    python -m mdistiller_blockkd make-detection-set --out data/fmnist_det [--train 800 --val 200 --size 96 --seed 0]
    python tools/make_detection_set.py ...                                   (in a checkout)

See :mod:`mdistiller_blockkd.detection.make_canvas`.
"""

from __future__ import annotations

import sys

from ..errors import run_cli


def main(argv=None):
    """Build the set (arguments: ``--help``); returns ``{split: (images, boxes)}``."""
    from ..detection.make_canvas import main as _main

    return _main(argv)


def cli(argv=None) -> int:
    """Console-script entry point: :func:`main` with one ``error:`` line for a user error."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
