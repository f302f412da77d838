"""Model adapters: find where things are in each supported architecture.

The engine (:mod:`tokenprune.core`) never names a model; it reads an :class:`Anatomy` that an
adapter builds from the model's modules. Adding the next family (Gemma 3, InternVL, Idefics3, ...)
is one adapter file here plus one line in :func:`anatomy_of`:

1. ``vision``: a :class:`VisionParts` -- the encoder's layer list, how to reach each layer's
   attention and norms, ``has_cls``, the patch ``grid``, the ``tower`` kind (``"batched"``: a
   (T, N, D) batch of images / crops, whose CLS, received-attention and key scores the engine
   computes; ``"packed"``: one sequence for all images, with the adapter's own ``scorers``), and
   ``vision_site`` = the reason vision-site stages cannot run inside it (None if they can).
2. ``llm``: :class:`LLMParts` (``llava.llm_parts`` serves any Llama-style decoder; set
   ``head_norms`` for per-head q/k norms, ``injections`` for features the LLM adds to visual tokens
   between layers, as Qwen3-VL's deepstack).
3. ``vlm_core``: the module whose forward merges visual features into the text sequence (its
   forward pre-hook is the pre-LLM site), and ``sequence``: a :class:`Sequence` with one
   :class:`Modality` per visual input (placeholder token id, pixel inputs, the core's encoder method
   and how to call it on a forward's inputs, an :class:`ImageLayout` per item -- which tokens are
   base view, tile, frame, newline, and where they sit), the per-token inputs compacted with
   ``input_ids``, and the position kind (``"1d"``, or ``"mrope"`` with the model's own rope-index
   function and its decode continuation).

Tests: build the family's tiny model from a config in ``tests/tiny.py`` and run the invariants of
``tests/test_qwen.py`` (budget 1.0 exact for every method or a typed refusal, ``remove()``, batch
equals samples alone, pre-LLM pruning equals an explicitly pruned reference, KV-cache decoding).
"""

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
