"""Adapters for standalone vision encoders: ViT, CLIP (vision side) and SigLIP (vision side)."""

from __future__ import annotations

from torch import nn

from .base import Anatomy, VisionParts


def _attention_of(layer: nn.Module) -> nn.Module:
    """The attention module of an encoder layer: the child that owns ``q_proj`` and ``k_proj``."""
    for name in ("self_attn", "attention"):
        attn = getattr(layer, name, None)
        if attn is not None and hasattr(attn, "k_proj") and hasattr(attn, "q_proj"):
            return attn
    raise AttributeError(f"{type(layer).__name__} has no attention child with q_proj/k_proj")


def _first_child(layer: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    """The first of ``names`` that ``layer`` has (the CLIP/SigLIP name, then the ViT one)."""
    for name in names:
        child = getattr(layer, name, None)
        if child is not None:
            return child
    raise AttributeError(f"{type(layer).__name__} has no {what}")


def _input_norm_of(layer: nn.Module) -> nn.Module:
    """The norm applied before attention (CLIP/SigLIP ``layer_norm1``, ViT ``layernorm_before``)."""
    return _first_child(layer, ("layer_norm1", "layernorm_before"), "pre-attention norm")


def _mlp_norm_of(layer: nn.Module) -> nn.Module:
    """The norm applied before the MLP (CLIP/SigLIP ``layer_norm2``, ViT ``layernorm_after``)."""
    return _first_child(layer, ("layer_norm2", "layernorm_after"), "pre-MLP norm")


def _find_layers(encoder: nn.Module) -> nn.ModuleList:
    """Duck-typed search for the encoder's layer list (a ModuleList whose items have attention)."""
    for module in encoder.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            try:
                _attention_of(module[0])
                return module
            except AttributeError:
                continue
    raise AttributeError(f"no transformer layer list found in {type(encoder).__name__}")


def vision_parts(encoder: nn.Module, config, has_cls: bool) -> VisionParts:
    """Describe a ViT/CLIP/SigLIP vision transformer (the module that owns embeddings + layers)."""
    side = config.image_size // config.patch_size
    return VisionParts(
        layers=_find_layers(encoder),
        attention=_attention_of,
        input_norm=_input_norm_of,
        has_cls=has_cls,
        grid=(side, side),
        mlp_norm=_mlp_norm_of,
        mlp=lambda layer: layer.mlp,
    )


def vision_encoder_anatomy(model: nn.Module) -> Anatomy | None:
    """Anatomy of a standalone encoder, or None if ``model`` is not one we know."""
    from transformers import (
        CLIPModel,
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
        SiglipModel,
        SiglipVisionModel,
        ViTForImageClassification,
        ViTModel,
    )

    if isinstance(model, (ViTModel, ViTForImageClassification)):
        vit = model if isinstance(model, ViTModel) else model.vit
        return Anatomy("vit", model, vision_parts(vit, vit.config, has_cls=True))
    if isinstance(model, (CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel)):
        cfg = model.config.vision_config if isinstance(model, CLIPModel) else model.config
        return Anatomy("clip", model, vision_parts(getattr(model, "vision_model", model), cfg, has_cls=True))
    if isinstance(model, (SiglipVisionModel, SiglipModel)):
        cfg = model.config.vision_config if isinstance(model, SiglipModel) else model.config
        return Anatomy("siglip", model, vision_parts(getattr(model, "vision_model", model), cfg, has_cls=False))
    return None
