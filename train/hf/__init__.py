"""Hugging Face interop: the exported model's code (``modeling``, ``configuration``), the
bundler that copies Hylas's modules into an export (``bundle``), the stock-architecture
mappings (``stock``), and the two directions, ``export`` and ``importer``
(docs/architecture.md, "Hugging Face export")."""
