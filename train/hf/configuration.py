"""The Hugging Face configuration of a Hylas model (``model_type`` "hylas").

``hylas_model`` holds Hylas's own model config whole (``ModelConfig.to_dict``); the fields
other tools read (``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ...) are derived
from it. The per-layer pattern is ``mixer_pattern`` (``L`` linear, ``F`` softmax) and
``ffn_pattern`` (``M`` MoE, ``D`` dense): transformers reserves ``layer_types`` for its own
layer kinds. ``hylas export`` copies this module into the export as configuration_hylas.py
(``hylas.train.hf.bundle``).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from hylas.model.config import ModelConfig

# -- the bundled modules --

# Derived from ``hylas_model``; a value for one of them in the arguments is ignored.
DERIVED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "rms_norm_eps",
    "mixer_pattern",
    "ffn_pattern",
    "tie_word_embeddings",
)


class HylasConfig(PretrainedConfig):
    model_type = "hylas"
    keys_to_ignore_at_inference = ["cache"]  # noqa: RUF012

    def __init__(
        self,
        hylas_model: dict | None = None,
        hylas_version: str = "",
        hylas_source_digest: str = "",
        kernel_backend: str = "auto",
        max_position_embeddings: int = 2048,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        model = ModelConfig.from_dict(hylas_model) if hylas_model else ModelConfig()
        self.hylas_model = model.to_dict()
        self.hylas_version = hylas_version
        self.hylas_source_digest = hylas_source_digest
        self.kernel_backend = kernel_backend
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache
        self.pad_token_id, self.bos_token_id = pad_token_id, bos_token_id
        self.eos_token_id = eos_token_id
        self.vocab_size = model.vocab_size
        self.hidden_size = model.d_model
        self.num_hidden_layers = model.n_layers
        self.num_attention_heads = model.n_heads
        self.num_key_value_heads = model.kv_heads
        self.intermediate_size = model.ffn_dim
        self.rms_norm_eps = model.norm_eps
        self.mixer_pattern = model.pattern
        self.ffn_pattern = model.ffn_pattern
        self.tie_word_embeddings = model.tie_embeddings
        for name in DERIVED:
            kwargs.pop(name, None)
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.hylas_model)
