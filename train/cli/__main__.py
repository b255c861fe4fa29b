"""``python -m hylas.train.cli``: the ``hylas`` command."""

import sys

from hylas.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
