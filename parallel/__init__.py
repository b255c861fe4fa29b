"""Parallelism applied from outside the model: process groups (dp x sp, ep inside),
LASP-2 / LASP-2H sequence parallelism and expert dispatch. Model code never imports this.

This version trains in one process; multi-process training comes with the DeepSpeed
engine and LASP-2 work, and ``parallel.*`` config keys are refused until then.
"""
