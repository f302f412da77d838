"""vLLM's LLaVA-NeXT with tokenprune's pre-LLM methods, registered under the stock architecture name
(the shared machinery is in ``model.py``). An image is a base crop plus anyres tiles, each a tower row;
its tokens reach the LLM as base patches, then the unpadded tiles row by row with a newline token after
each row, which is the layout tokenprune's LLaVA-NeXT adapter derives from transformers' own packing."""

from __future__ import annotations

import torch
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .model import TOWER_NAMES, LlavaFamily, PrunedInfo


class TokenpruneLlavaNextProcessingInfo(PrunedInfo, LlavaNextProcessingInfo):
    """Placeholders per image: what the method keeps of the image's tokens (its layout depends on its size)."""

    layout_needs_size = True


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor, info=TokenpruneLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class TokenpruneLlavaNextForConditionalGeneration(LlavaFamily, LlavaNextForConditionalGeneration, SupportsMRoPE):
    """Stock vLLM LLaVA-NeXT plus tokenprune's pre-LLM stage (active when the config has a ``tokenprune`` entry)."""

    hf_to_vllm_mapper = LlavaNextForConditionalGeneration.hf_to_vllm_mapper | TOWER_NAMES
    stock_info = LlavaNextProcessingInfo

    def _geometry(self, image_input, features):
        pixel_values = image_input["pixel_values"]
        if isinstance(pixel_values, torch.Tensor):  # (B, crops, ...): every image padded to the same crop count
            first_rows = [b * pixel_values.shape[1] for b in range(len(features))]
        else:
            first_rows = torch.tensor([0] + [v.shape[0] for v in pixel_values]).cumsum(0)[:-1].tolist()
        return {"image_sizes": torch.as_tensor(image_input["image_sizes"]).cpu()}, first_rows
