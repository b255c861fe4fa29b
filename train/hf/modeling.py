"""The Hugging Face wrapper of a Hylas model: ``HylasForCausalLM``.

It holds Hylas's own ``HylasLM`` as ``self.model`` (parameter names ``model.<Hylas name>``)
and its own cache, ``HybridCache`` (each linear layer's state and conv tails, each softmax
layer's keys and values), which ``generate()`` carries from step to step under the name
``cache``. An attention mask reaches every mixer, so left-padded batches give each row
what it gives alone.

``hylas export`` copies this module into the export as modeling_hylas.py, with the model
code it imports (``hylas.train.hf.bundle``). When the exported code runs where Hylas itself
is installed, with the very sources the export was made from (the same
``hylas_source_digest``), it uses the installed Hylas instead, whose kernels run on Triton
on CUDA; otherwise the bundled copy, with the torch chunkwise kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from hylas.configs.base import IGNORE_INDEX
from hylas.model.config import ModelConfig
from hylas.model.decoder import HylasLM
from hylas.train.hf.configuration import HylasConfig

# -- the bundled modules --


def installed_hylas(digest: str):
    """(HylasLM, ModelConfig) of an installed Hylas whose model sources have ``digest``, or
    None. Imports sit in a ``try`` block: transformers' import check skips them, and an
    export loads where Hylas is not installed."""
    try:
        from hylas.model.config import ModelConfig as InstalledConfig
        from hylas.model.decoder import HylasLM as InstalledLM
        from hylas.train.hf.bundle import source_digest
    except ImportError:
        return None
    return (InstalledLM, InstalledConfig) if digest and source_digest() == digest else None


class HylasForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HylasConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]  # noqa: RUF012
    # Applied only where config.tie_word_embeddings is true (transformers 5: target: source).
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}  # noqa: RUF012
    _is_stateful = True  # a recurrent cache: no assisted decoding

    def __init__(self, config: HylasConfig):
        super().__init__(config)
        found = installed_hylas(config.hylas_source_digest)
        lm, cfg_class = found or (HylasLM, ModelConfig)
        backend = config.kernel_backend if found else "torch"
        self.model = lm(cfg_class.from_dict(config.hylas_model), backend)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not hand in a DynamicCache: the model makes its own

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """Only the buffers no checkpoint holds: the parameters are Hylas's own init (eager)
        or the loaded weights."""
        init_buffers = getattr(module, "init_buffers", None)
        if init_buffers is not None and module is not self.model:
            init_buffers()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        use_cache: bool | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """labels, as transformers gives them, are the inputs (shifted here; -100 ignored);
        the loss is the mean next-token cross-entropy, without MoE auxiliary losses.

        These few lines are the export's own loss, transformers' convention: an exported
        model cannot ship ``hylas.train``, where the training objective lives
        (``hylas.train.loss``, which adds MoE terms and runs the head in chunks)."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("Hylas models take input_ids (inputs_embeds is not supported)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        out = self.model(
            input_ids,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            attention_mask=attention_mask,
        )
        loss = None
        if labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            loss = F.cross_entropy(
                out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=out.logits, cache=out.cache if use_cache else None
        )

    def _reorder_cache(self, cache, beam_idx: torch.Tensor):
        cache.reorder_cache(beam_idx)
        return cache
