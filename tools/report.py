#!/usr/bin/env python
"""``python tools/report.py ...``: the report command (mdistiller's habit); same as ``python -m mdistiller_blockkd report ...``.

The command lives in :mod:`mdistiller_blockkd.cli.report`; this wrapper needs the package
installed (``pip install -e .`` in a checkout).
"""

import sys

from mdistiller_blockkd.cli.report import cli

if __name__ == "__main__":
    sys.exit(cli())
