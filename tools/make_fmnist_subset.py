#!/usr/bin/env python
"""``python tools/make_fmnist_subset.py ...``: the make-fmnist-subset command (mdistiller's habit); same as ``python -m mdistiller_blockkd make-fmnist-subset ...``.

The command lives in :mod:`mdistiller_blockkd.cli.make_fmnist_subset`; this wrapper needs the package
installed (``pip install -e .`` in a checkout).
"""

import sys

from mdistiller_blockkd.cli.make_fmnist_subset import cli

if __name__ == "__main__":
    sys.exit(cli())
