"""Model adapters: find where things are in each supported architecture."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import Anatomy, ImageLayout, LLMParts, VisionParts, grid_layout
from .llava import llava_anatomy, llava_next_anatomy
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
)


def anatomy_of(model: nn.Module) -> Anatomy:
    """Return the :class:`Anatomy` of ``model`` or raise :class:`UnsupportedModelError`."""
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaModel,
        LlavaNextForConditionalGeneration,
        LlavaNextModel,
    )

    if isinstance(model, (LlavaNextForConditionalGeneration, LlavaNextModel)):
        return llava_next_anatomy(model)
    if isinstance(model, (LlavaForConditionalGeneration, LlavaModel)):
        return llava_anatomy(model)
    found = vision_encoder_anatomy(model) if isinstance(model, nn.Module) else None
    if found is None:
        raise UnsupportedModelError(
            f"model: {type(model).__name__} is not supported; supported models: {', '.join(SUPPORTED)}"
        )
    return found


__all__ = ["Anatomy", "ImageLayout", "LLMParts", "VisionParts", "anatomy_of", "grid_layout", "SUPPORTED"]
