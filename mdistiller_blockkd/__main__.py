"""``python -m mdistiller_blockkd <command> [args]`` (see :mod:`mdistiller_blockkd.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
