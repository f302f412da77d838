"""Model adapters: find where things are in each supported architecture."""

from __future__ import annotations

import gc

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
    _refuse_inside_a_model(model)
    return found


def _refuse_inside_a_model(encoder: nn.Module) -> None:
    """An :class:`UnsupportedModelError` when ``encoder`` is the tower of a vision-language model (a
    model whose config has ``vision_config`` and ``text_config``): the VLM reads every patch, so pruning
    the tower alone breaks it (PaliGemma, Gemma 3) or bypasses its adapter (LLaVA). Encoders inside
    other modules (a ViT classifier's ``.vit``, a user's wrapper) stay the user's to prune."""
    top, owners = encoder, []
    while (up := _parent(top)) is not None and up not in owners:
        top = up
        owners.append(top)
    cfgs = [getattr(m, "config", None) for m in owners]
    if not any(hasattr(c, "vision_config") and hasattr(c, "text_config") for c in cfgs):
        return
    name = type(top).__name__
    hint = f"patch the {name} itself" if name in SUPPORTED else f"{name} is not supported"
    raise UnsupportedModelError(
        f"model: this {type(encoder).__name__} is the vision tower of a {name}, which reads every patch it "
        f"outputs, so it cannot be pruned on its own; {hint} (supported models: {', '.join(SUPPORTED)})"
    )


def _parent(module: nn.Module) -> nn.Module | None:
    """The module holding ``module`` in its ``_modules`` (torch keeps no parent link: the garbage
    collector's referrers give it, through the instance ``__dict__`` where Python keeps one)."""
    for children in gc.get_referrers(module):
        if type(children) is not dict or not any(v is module for v in children.values()):
            continue
        for holder in gc.get_referrers(children):
            if type(holder) is dict and holder.get("_modules") is children:  # the parent's __dict__
                holder = next((m for m in gc.get_referrers(holder) if getattr(m, "__dict__", None) is holder), None)
            if issubclass(type(holder), nn.Module) and holder._modules is children:
                return holder
    return None


__all__ = ["Anatomy", "ImageLayout", "LLMParts", "VisionParts", "anatomy_of", "grid_layout", "SUPPORTED"]
