"""Experiments on top of the trainer: the linear-to-full ratio sweep (``sweep``), the
synthetic MQAR task (``mqar``) and the recall probes (``recall`` for an architecture
trained on MQAR, ``eval_recall`` for a trained checkpoint) (docs/architecture.md, "Ratio
sweeps")."""
