#!/usr/bin/env python
"""``python tools/make_wordnet_set.py ...``: the make-wordnet-set command (mdistiller's habit); same as ``python -m mdistiller_blockkd make-wordnet-set ...``.

The command lives in :mod:`mdistiller_blockkd.cli.make_wordnet_set`; this wrapper needs the package
installed (``pip install -e .`` in a checkout).
"""

import sys

from mdistiller_blockkd.cli.make_wordnet_set import cli

if __name__ == "__main__":
    sys.exit(cli())
