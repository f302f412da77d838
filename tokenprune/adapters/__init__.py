"""Model adapters: find where things are in each supported architecture."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import Anatomy, ImageLayout, LLMParts, VisionParts, grid_layout
from .llava import llava_anatomy, llava_next_anatomy
from .onevision import onevision_anatomy
from .qwen import qwen_anatomy
from .vision import vision_encoder_anatomy

SUPPORTED = (
    "ViTModel",
    "ViTForImageClassification",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPModel",
    "SiglipVisionModel",
    "SiglipModel",
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
)

QWEN = {  # adapter name -> (ForConditionalGeneration, core) class names in transformers
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLModel"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLModel"),
}


def anatomy_of(model: nn.Module) -> Anatomy:
    """Return the :class:`Anatomy` of ``model`` or raise :class:`UnsupportedModelError`."""
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaModel,
        LlavaNextForConditionalGeneration,
        LlavaNextModel,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionModel,
    )

    if isinstance(model, (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel)):
        return onevision_anatomy(model)
    if isinstance(model, (LlavaNextForConditionalGeneration, LlavaNextModel)):
        return llava_next_anatomy(model)
    if isinstance(model, (LlavaForConditionalGeneration, LlavaModel)):
        return llava_anatomy(model)
    import transformers

    for name, classes in QWEN.items():
        if isinstance(model, tuple(getattr(transformers, c) for c in classes)):
            return qwen_anatomy(model, name)
    found = vision_encoder_anatomy(model) if isinstance(model, nn.Module) else None
    if found is None:
        raise UnsupportedModelError(
            f"model: {type(model).__name__} is not supported; supported models: {', '.join(SUPPORTED)}"
        )
    return found


__all__ = ["Anatomy", "ImageLayout", "LLMParts", "VisionParts", "anatomy_of", "grid_layout", "SUPPORTED"]
