"""Adapters for LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT
(``LlavaNextForConditionalGeneration``): vision tower, projector, language model, image layouts."""

from __future__ import annotations

import torch
from torch import nn

from .base import Anatomy, ImageLayout, LLMParts, Modality, Sequence, grid_layout
from .vision import vision_encoder_anatomy


def llm_parts(language_model: nn.Module) -> LLMParts:
    layers = language_model.layers
    first = layers[0]
    if not (hasattr(first, "self_attn") and hasattr(first, "input_layernorm")):
        raise AttributeError(f"{type(first).__name__} is not a Llama-style decoder layer")
    return LLMParts(
        layers=layers,
        attention=lambda layer: layer.self_attn,
        input_norm=lambda layer: layer.input_layernorm,
        rotary=language_model.rotary_emb,
        config=language_model.config,
        norm=getattr(language_model, "norm", None),
    )


def _tower_anatomy(core: nn.Module) -> Anatomy:
    tower = vision_encoder_anatomy(core.vision_tower)
    if tower is None:
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError(
            f"model: the vision tower {type(core.vision_tower).__name__} is not supported; "
            "supported towers: CLIPVisionModel, SiglipVisionModel"
        )
    return tower


def _vlm_anatomy(name: str, model: nn.Module, core: nn.Module, vision, layouts) -> Anatomy:
    """A LLaVA-style VLM: one image modality encoded by ``get_image_features`` at
    ``vision_feature_layer`` / ``vision_feature_select_strategy``, 1-D positions."""
    cfg = core.config

    def strategy(inputs: dict) -> str:
        return inputs.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy

    def encode(inputs: dict):
        extra = {"image_sizes": inputs["image_sizes"]} if inputs.get("image_sizes") is not None else {}
        return core.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=inputs.get("vision_feature_layer"),
            vision_feature_select_strategy=inputs.get("vision_feature_select_strategy"),
            return_dict=True,
            **extra,
        )

    image = Modality("image", int(cfg.image_token_id), ("pixel_values",), "get_image_features", encode, layouts)
    return Anatomy(
        name=name,
        model=model,
        vision=vision,
        llm=llm_parts(core.language_model),
        vlm_core=core,
        image_token_id=int(cfg.image_token_id),
        feature_layer=cfg.vision_feature_layer,
        sequence=Sequence((image,), feature_cls=lambda inputs: int(vision.has_cls and strategy(inputs) == "full")),
        pad_token_id=int(getattr(cfg.text_config, "pad_token_id", None) or 0),
    )


def llava_anatomy(model: nn.Module) -> Anatomy:
    """Anatomy of a LLaVA-1.5 model (``LlavaForConditionalGeneration`` or ``LlavaModel``)."""
    core = getattr(model, "model", model)
    vision = _tower_anatomy(core).vision
    rows, cols = vision.grid
    if core.config.vision_feature_select_strategy == "default" and not vision.has_cls:
        vision.vision_site = (
            "its vision_feature_select_strategy='default' drops the tower's first output token, which this tower "
            "(no CLS token, e.g. SigLIP) makes a patch, so pruning inside the tower would change which patch is "
            "dropped; use a method acting before or inside the LLM, or a model with strategy 'full'"
        )

    def layouts(lengths: list[int], inputs: dict) -> list[ImageLayout]:
        return [grid_layout(rows, cols, cls=(n == rows * cols + 1), first=int(n == rows * cols - 1)) for n in lengths]

    return _vlm_anatomy("llava", model, core, vision, layouts)


def anyres_layout(cfg, g: int, image_size: torch.Tensor, n_tiles: int, pack) -> ImageLayout:
    """Layout of one anyres image (LLaVA-NeXT / LLaVA-OneVision) of ``n_tiles`` crops on a ``g x g``
    patch grid, derived by running the model's own packing ``pack(features, image_size)`` on index
    tensors (tile, row, col per token; -1 for newline tokens), so tiling, unpadding and newline
    tokens follow transformers' logic exactly (coordinates are rounded where OneVision's anyres_max
    downsamples the tile canvas)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    r, c = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    idx = torch.stack([torch.stack([torch.full_like(r, t), r, c], -1).reshape(g * g, 3) for t in range(n_tiles)])
    tile, row, col = pack(idx.float(), image_size).round().long().unbind(-1)
    y, x = (row.float() + 0.5) / g, (col.float() + 0.5) / g
    hi = tile > 0
    if hi.any():  # tiles: place rows/cols on the unpadded high-resolution canvas
        _, grid_w = get_anyres_image_grid_shape(image_size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        gy = (tile[hi] - 1) // grid_w * g + row[hi]
        gx = (tile[hi] - 1) % grid_w * g + col[hi]
        y[hi] = (gy - gy.min()).float().add(0.5) / float(gy.max() - gy.min() + 1)
        x[hi] = (gx - gx.min()).float().add(0.5) / float(gx.max() - gx.min() + 1)
    parts = {"base": (tile == 0).nonzero().flatten()}
    for t in range(1, n_tiles):
        parts[f"tile{t}"] = (tile == t).nonzero().flatten()
    if (tile == -1).any():
        parts["newline"] = (tile == -1).nonzero().flatten()
    return ImageLayout(tile=tile, row=row, col=col, y=y, x=x, grid=(g, g), partitions=parts)


def llava_next_anatomy(model: nn.Module) -> Anatomy:
    """Anatomy of a LLaVA-NeXT model (image layouts: :func:`anyres_layout`)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    core = getattr(model, "model", model)
    cfg = core.config
    vision = _tower_anatomy(core).vision
    g = vision.grid[0]
    newline = torch.full((3,), -1.0)

    def pack(idx: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
        return core.pack_image_features([idx], image_size[None], cfg.vision_feature_select_strategy,
                                        image_newline=newline)[0][0]

    def one_layout(image_size: torch.Tensor) -> ImageLayout:
        n_tiles = image_size_to_num_patches(
            image_size=image_size, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size
        )
        return anyres_layout(cfg, g, image_size, n_tiles, pack)

    def layouts(lengths: list[int], inputs: dict) -> list[ImageLayout]:
        image_sizes = inputs.get("image_sizes")
        if image_sizes is None:
            raise ValueError("image_sizes is required to lay out LLaVA-NeXT image tokens")
        out = [one_layout(torch.as_tensor(s).cpu()) for s in image_sizes]
        got = [lay.num_tokens for lay in out]
        if got != list(lengths):
            raise RuntimeError(f"LLaVA-NeXT layout has {got} tokens per image but the model produced {lengths}")
        return out

    vision.vision_site = "vision-site stages are not supported inside LLaVA-NeXT's tiled tower"
    return _vlm_anatomy("llava_next", model, core, vision, layouts)
