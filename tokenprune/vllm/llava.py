"""vLLM's LLaVA-1.5 with tokenprune's pre-LLM methods (registered under the stock architecture name).

* Prompt processing (:class:`TokenpruneLlavaProcessingInfo`): an image expands to the number of
  tokens the method keeps of it, found from its geometry and the budget (``dry_run_counts``).
* Encoding (:meth:`TokenpruneLlavaForConditionalGeneration._process_image_input`): the tower's
  attention inputs and outputs are captured at the stage's layers, the pre-LLM context is built,
  ``stage.select`` chooses, and each kept row carries its position shift (``positions.py``).
* Positions: text at its unpruned position, kept image tokens at ``image start + original index``,
  decoding from the unpruned length, as tokenprune's Hugging Face path does.

Without a ``tokenprune`` entry in the config (or at budget 1.0) every method falls through to stock
vLLM. Checkpoints that keep the CLIP tower's keys directly under ``vision_tower.`` (how
transformers >= 5 saves LLaVA, e.g. tokenprune's bundled fixture) load through an extra weight-name
rule; the names vLLM already reads are unaffected.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence

import torch
from transformers import LlavaConfig, PixtralVisionConfig
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaProcessingInfo,
    PixtralHFProcessingInfo,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.model_executor.models.vision import get_num_selected_vision_tokens, get_vision_encoder_info
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..errors import SiteError
from .config_hook import spec_of
from .context import TowerCapture, dry_run_counts, image_context, select
from .positions import decode_shifts, encode_shifts, prompt_positions

TRACE_LENGTH = 1024


class TokenpruneLlavaProcessingInfo(LlavaProcessingInfo):
    """Placeholders per image: what the method keeps of the image's tokens."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        spec = spec_of(self.get_hf_config())
        if spec is None or spec.keeps_everything:
            return n
        return kept_count(spec, n)


def kept_count(spec, n: int) -> int:
    """Tokens the method keeps of a LLaVA-1.5 image of ``n`` tokens (cached per spec and n)."""
    cache = _COUNTS.setdefault(id(spec), {})
    if n not in cache:
        cache[n] = dry_run_counts(spec.stage, spec.anatomy.layouts([n], None))[0]
    return cache[n]


_COUNTS: dict[int, dict[int, int]] = {}


def _info(ctx):
    if isinstance(ctx.get_hf_config(LlavaConfig).vision_config, PixtralVisionConfig):
        return PixtralHFProcessingInfo(ctx)
    return TokenpruneLlavaProcessingInfo(ctx)


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor, info=_info, dummy_inputs=LlavaDummyInputsBuilder
)
class TokenpruneLlavaForConditionalGeneration(LlavaForConditionalGeneration, SupportsMRoPE):
    """Stock vLLM LLaVA plus tokenprune's pre-LLM stage (active when the config has a ``tokenprune`` entry)."""

    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | WeightsMapper(
        orig_to_new_regex={
            re.compile(r"^((?:model\.)?vision_tower\.)(?=(?:embeddings|encoder|pre_layrnorm|post_layernorm)\.)"): (
                r"\1vision_model."
            )
        }
    )

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        spec = spec_of(self.config)
        self._spec = None if spec is None or spec.keeps_everything else spec
        self._shift: torch.Tensor | None = None  # this step's per-token position shifts (kept image tokens)
        self.kept_trace: deque[list[int]] = deque(maxlen=TRACE_LENGTH)  # kept original indices, per encoded image
        self._captured: tuple[dict, dict] = ({}, {})
        if self._spec is not None:
            self._capture = self._install_capture(self._spec.stage.capture)
        info = get_vision_encoder_info(self.config)
        side = info.get_image_size()
        self._n_full = get_num_selected_vision_tokens(
            info.get_num_image_tokens(image_width=side, image_height=side), self.config.vision_feature_select_strategy
        )

    # --- encoding -------------------------------------------------------------------------------
    def _install_capture(self, layers: Sequence[int]) -> TowerCapture:
        tower = self.vision_tower
        encoder = getattr(tower, "vision_model", tower).encoder.layers
        inputs, outputs = self._captured
        depth = self._spec.anatomy.vision.num_layers
        for layer in sorted({c % depth for c in layers}):
            if layer >= len(encoder):
                raise SiteError(
                    f"layer: encoder layer {layer} lies past the feature layer; vLLM builds only "
                    f"{len(encoder)} layers of this tower"
                )
            block = encoder[layer]

            def keep_input(mod, args, kwargs, layer=layer):
                inputs[layer] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

            def keep_output(mod, args, out, layer=layer):
                outputs[layer] = out

            block.self_attn.register_forward_pre_hook(keep_input, with_kwargs=True)
            block.register_forward_hook(keep_output)
        attn = encoder[0].self_attn

        def heads(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
            mod = encoder[layer % depth].self_attn
            qkv, _ = mod.qkv_proj(inputs[layer % depth])
            q, k, _ = qkv.chunk(3, dim=-1)
            t, s, _ = k.shape
            k = k.view(t, s, mod.num_heads_per_partition, mod.head_dim).transpose(1, 2)
            q = q[:, :1].view(t, 1, mod.num_heads_per_partition, mod.head_dim).transpose(1, 2)
            return q, k

        reduce = (lambda x: x) if getattr(attn, "tp_size", 1) == 1 else _all_reduce
        vision = self._spec.anatomy.vision
        return TowerCapture(heads, outputs, attn.num_heads, attn.scale, vision.has_cls, vision.grid, reduce)

    def _clear_capture(self) -> None:
        for store in self._captured:
            store.clear()

    def _process_image_input(self, image_input):
        if self._spec is None:
            return super()._process_image_input(image_input)
        if isinstance(image_input, LlavaImageEmbeddingInputs):  # user embeddings: placeholders were sized from them
            return [encode_shifts(e, torch.arange(e.shape[0])) for e in image_input["data"]]
        self._clear_capture()
        features = list(super()._process_image_input(image_input))
        layouts = self._spec.anatomy.layouts([f.shape[0] for f in features], None)
        rows = [torch.full((f.shape[0],), b, dtype=torch.long) for b, f in enumerate(features)]
        ctx = image_context(features, layouts, rows, self._capture, self.multi_modal_projector)
        kept, chosen = select(self._spec.stage, ctx)
        self._clear_capture()
        out = []
        for b, f in enumerate(features):
            k = int((kept[b] >= 0).sum())
            expected = kept_count(self._spec, f.shape[0])
            if k != expected:
                raise RuntimeError(
                    f"{self._spec.method.name} kept {k} tokens of an image where its placeholders hold {expected}: "
                    "its count depends on the image content, which vLLM cannot serve"
                )
            out.append(encode_shifts(chosen[b, :k].to(f.dtype), kept[b, :k]))
            self.kept_trace.append(kept[b, :k].tolist())
        return out

    # --- positions --------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        images = []
        for f in mm_features:
            kept = f.mm_position.length
            full = kept if "image_embeds" in (f.data or {}) else self._n_full
            images.append((f.mm_position.offset, kept, full))
        return prompt_positions(len(input_tokens), images)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if self._spec is None or not multimodal_embeddings:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        embeds, shifts = zip(*(decode_shifts(e) for e in multimodal_embeddings))
        shift = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        shift[is_multimodal] = torch.cat(shifts).to(shift.device)
        self._shift = shift
        return super().embed_input_ids(input_ids, list(embeds), is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        shift, self._shift = self._shift, None
        if shift is not None:
            positions = positions.clone()
            positions[..., : shift.shape[0]] += shift
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(t.contiguous())
