"""Adapter for LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration`` / ``LlavaOnevisionModel``).

Declared differences from LLaVA-NeXT: a SigLIP tower without CLS (its features are read whole,
``vision_feature_select_strategy="full"``); anyres-max tiling (the tile canvas is downsampled when
it holds more than ``anyres_max_N`` tiles' worth of patches; a sample with several images gets no
tiles); and a video modality: every frame through the tower, 2x2 bilinear pooling, one newline
token after the last frame. A video's ``pooler_output`` is one tensor (the model flattens it), so
kept video features are packed back as one (1, N, D) tensor.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Anatomy, ImageLayout, Modality, Sequence, frames_layout
from .llava import _tower_anatomy, anyres_layout, llm_parts


def onevision_anatomy(model: nn.Module) -> Anatomy:
    """Anatomy of a LLaVA-OneVision model."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    core = getattr(model, "model", model)
    cfg = core.config
    vision = _tower_anatomy(core).vision
    vision.vision_site = "vision-site stages are not supported inside LLaVA-OneVision's tiled tower"
    g = vision.grid[0]
    pooled = math.ceil(g / 2)
    newline = torch.full((3,), -1.0)

    def pack(idx: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
        return core.pack_image_features([idx], image_size[None], image_newline=newline,
                                        vision_aspect_ratio=cfg.vision_aspect_ratio)[0][0]

    def image_layouts(lengths: list[int], inputs: dict) -> list[ImageLayout]:
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError("image_sizes is required to lay out LLaVA-OneVision image tokens")
        per_sample = inputs.get("batch_num_images")
        tiled = [True] * len(sizes) if per_sample is None else [int(n) == 1 for n in per_sample for _ in range(int(n))]
        out = []
        for size, tile in zip(sizes, tiled):
            size = torch.as_tensor(size).cpu()
            n_tiles = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            out.append(anyres_layout(cfg, g, size, n_tiles if tile else 1, pack))
        got = [lay.num_tokens for lay in out]
        if got != list(lengths):
            raise RuntimeError(f"LLaVA-OneVision layout has {got} tokens per image but the model produced {lengths}")
        return out

    def video_layouts(lengths: list[int], inputs: dict) -> list[ImageLayout]:
        frames = int(inputs["pixel_values_videos"].shape[1])
        lay = frames_layout(frames, pooled, pooled, video=True)
        n = lay.num_tokens
        lay = ImageLayout(
            tile=torch.cat([lay.tile, torch.tensor([-1])]), row=torch.cat([lay.row, torch.tensor([0])]),
            col=torch.cat([lay.col, torch.tensor([0])]), y=torch.cat([lay.y, torch.tensor([1.0])]),
            x=torch.cat([lay.x, torch.tensor([1.0])]), grid=lay.grid,
            partitions={**lay.partitions, "newline": torch.tensor([n])},
            frame=torch.cat([lay.frame, torch.tensor([frames - 1])]),
        )
        if any(length != n + 1 for length in lengths):
            raise RuntimeError(f"LLaVA-OneVision video layout has {n + 1} tokens but the model produced {lengths}")
        return [lay] * len(lengths)

    def encode_image(inputs: dict):
        extra = {k: inputs[k] for k in ("vision_feature_layer", "vision_feature_select_strategy",
                                        "vision_aspect_ratio", "batch_num_images") if inputs.get(k) is not None}
        return core.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True, **extra)

    def encode_video(inputs: dict):
        extra = {k: inputs[k] for k in ("vision_feature_layer", "vision_feature_select_strategy")
                 if inputs.get(k) is not None}
        return core.get_video_features(inputs["pixel_values_videos"], return_dict=True, **extra)

    modalities = (
        Modality("image", int(cfg.image_token_id), ("pixel_values",), "get_image_features", encode_image,
                 image_layouts),
        Modality("video", int(cfg.video_token_id), ("pixel_values_videos",), "get_video_features", encode_video,
                 video_layouts, pack=lambda feats: torch.cat(feats)[None]),
    )
    return Anatomy(
        name="llava_onevision",
        model=model,
        vision=vision,
        llm=llm_parts(core.language_model),
        vlm_core=core,
        image_token_id=int(cfg.image_token_id),
        feature_layer=cfg.vision_feature_layer,
        sequence=Sequence(modalities),
        pad_token_id=int(getattr(cfg.text_config, "pad_token_id", None) or 0),
    )
