"""vLLM's LLaVA-1.5 with tokenprune's pre-LLM methods, registered under the stock architecture name
(the shared machinery is in ``model.py``). One tower row per image."""

from __future__ import annotations

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
from vllm.multimodal import MULTIMODAL_REGISTRY

from .model import TOWER_NAMES, PrunedInfo, PrunedModel


class TokenpruneLlavaProcessingInfo(PrunedInfo, LlavaProcessingInfo):
    """Placeholders per image: what the method keeps of the image's tokens."""


def _info(ctx):
    if isinstance(ctx.get_hf_config(LlavaConfig).vision_config, PixtralVisionConfig):
        return PixtralHFProcessingInfo(ctx)
    return TokenpruneLlavaProcessingInfo(ctx)


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor, info=_info, dummy_inputs=LlavaDummyInputsBuilder
)
class TokenpruneLlavaForConditionalGeneration(PrunedModel, LlavaForConditionalGeneration, SupportsMRoPE):
    """Stock vLLM LLaVA plus tokenprune's pre-LLM stage (active when the config has a ``tokenprune`` entry)."""

    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | TOWER_NAMES
    stock_info = LlavaProcessingInfo

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokenprune_init(vllm_config)

    def _process_image_input(self, image_input):
        if self._spec is None:
            return super()._process_image_input(image_input)
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            return self._keep_all(image_input["data"])
        features = list(super()._process_image_input(image_input))
        return self._prune(features, None, list(range(len(features))))  # one tower row per image
