"""Training: configs, the loop, checkpoints, metrics and the ``hylas`` command line."""
