"""``python -m hylas.train``: the trainer, as launched by torchrun; same flags as ``hylas train``."""

import sys

from hylas.train.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
