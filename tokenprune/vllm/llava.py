"""vLLM's LLaVA-1.5 with tokenprune's pre-LLM methods, registered under the stock architecture name
(the shared machinery is in ``model.py``). One tower row per image."""

from __future__ import annotations

from transformers import LlavaConfig, PixtralVisionConfig
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaProcessingInfo,
    PixtralHFProcessingInfo,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .model import TOWER_NAMES, LlavaFamily, PrunedInfo


class TokenpruneLlavaProcessingInfo(PrunedInfo, LlavaProcessingInfo):
    """Placeholders per image: what the method keeps of the image's tokens."""


def _info(ctx):
    if isinstance(ctx.get_hf_config(LlavaConfig).vision_config, PixtralVisionConfig):
        return PixtralHFProcessingInfo(ctx)
    return TokenpruneLlavaProcessingInfo(ctx)


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor, info=_info, dummy_inputs=LlavaDummyInputsBuilder
)
class TokenpruneLlavaForConditionalGeneration(LlavaFamily, LlavaForConditionalGeneration, SupportsMRoPE):
    """Stock vLLM LLaVA plus tokenprune's pre-LLM stage (active when the config has a ``tokenprune`` entry)."""

    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | TOWER_NAMES
    stock_info = LlavaProcessingInfo

    def _geometry(self, image_input, features):
        return {"image_sizes": None}, list(range(len(features)))  # one tower row per image
