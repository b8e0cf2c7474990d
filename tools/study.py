#!/usr/bin/env python
"""``python tools/study.py ...``: the study command (mdistiller's habit); same as ``python -m mdistiller_blockkd study ...``.

The command lives in :mod:`mdistiller_blockkd.cli.study`; this wrapper needs the package
installed (``pip install -e .`` in a checkout).
"""

import sys

from mdistiller_blockkd.cli.study import cli

if __name__ == "__main__":
    sys.exit(cli())
