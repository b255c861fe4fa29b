"""Hybrid language models: mixers (linear and softmax), FFNs, blocks, the decoder, caches.

Model code is written for one device and never imports ``parallel``, ``train`` or ``data``.
"""

from hylas.model.config import ConfigError, ModelConfig
from hylas.model.decoder import HybridCache, HylasLM, LMOutput
from hylas.model.generation import generate

__all__ = ["ConfigError", "HybridCache", "HylasLM", "LMOutput", "ModelConfig", "generate"]
