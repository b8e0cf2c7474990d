#!/usr/bin/env python
"""``python tools/train.py ...``: the train command (mdistiller's habit); same as ``python -m mdistiller_blockkd train ...``.

The command lives in :mod:`mdistiller_blockkd.cli.train`; this wrapper needs the package
installed (``pip install -e .`` in a checkout).
"""

import sys

from mdistiller_blockkd.cli.train import cli

if __name__ == "__main__":
    sys.exit(cli())
