#!/usr/bin/env python
"""``python tools/benchmark.py ...``: the benchmark command (mdistiller's habit); same as ``python -m mdistiller_blockkd benchmark ...``.

The command lives in :mod:`mdistiller_blockkd.cli.benchmark`; this wrapper needs the package
installed (``pip install -e .`` in a checkout).
"""

import sys

from mdistiller_blockkd.cli.benchmark import cli

if __name__ == "__main__":
    sys.exit(cli())
