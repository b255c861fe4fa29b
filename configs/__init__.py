"""Shipped YAML recipes (package data); ``--config NAME`` loads ``NAME.yaml`` from here."""
