"""Parallelism applied from outside the model: the process layout (``mesh``: world =
dp x sp), sequence parallelism (``sp``: LASP-2 for the linear mixers, LASP-2H for softmax
attention, halos for short convolutions) and the communication tracer (``trace``).
The model's code never imports this package; ``sp.apply`` wraps its layers.
"""
