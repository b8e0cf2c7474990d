#!/usr/bin/env python
"""``python tools/demo.py ...``: the demo command (mdistiller's habit); same as ``python -m mdistiller_blockkd demo ...``.

The command lives in :mod:`mdistiller_blockkd.cli.demo`; this wrapper needs the package
installed (``pip install -e .`` in a checkout).
"""

import sys

from mdistiller_blockkd.cli.demo import cli

if __name__ == "__main__":
    sys.exit(cli())
