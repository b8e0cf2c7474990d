#!/usr/bin/env python
"""``python tools/eval.py ...``: the eval command (mdistiller's habit); same as ``python -m mdistiller_blockkd eval ...``.

The command lives in :mod:`mdistiller_blockkd.cli.eval`; this wrapper needs the package
installed (``pip install -e .`` in a checkout).
"""

import sys

from mdistiller_blockkd.cli.eval import cli

if __name__ == "__main__":
    sys.exit(cli())
