"""Adapters for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``*ForConditionalGeneration`` and their
``*Model`` cores).

What differs from LLaVA, as declarations the engine reads:

- images and videos (``pixel_values`` / ``pixel_values_videos``) are two modalities with their own
  placeholder tokens, encoded by ``get_image_features(pixel_values, image_grid_thw)`` /
  ``get_video_features(pixel_values_videos, video_grid_thw)``; ``mm_token_type_ids`` travels with
  ``input_ids``;
- a visual token is what the LLM sees: one 2x2 merged unit of the vision tower, laid out on the
  (h/2) x (w/2) merged grid of its image, frame after frame for a video;
- positions are M-RoPE: (3, B, L) ids from the model's own ``get_rope_index`` on the unpruned prompt
  (``generate()`` passes (4, B, L): a text row first); kept tokens keep them, and decoding continues
  as the unpruned sequence would, through the model's ``rope_deltas``;
- the tower is packed (one (N_total, D) sequence, ``cu_seqlens``, windows in Qwen2.5-VL): no
  vision-site stages there;
- Qwen3-VL's deepstack features (added to LLM layers 0-2 at the visual positions) are aligned with
  the merged units and pruned with them before the LLM.
"""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn

from ..core.scoring import segment_received_attention
from .base import Anatomy, ImageLayout, LLMParts, Modality, Sequence, VisionParts, frames_layout
from .llava import llm_parts

PACKED = (
    "vision-site stages are not supported inside Qwen's packed vision tower (one sequence for all images, cu_seqlens)"
)


def _layouts(kind: str, merge: int):
    def layouts(lengths: list[int], inputs: dict) -> list[ImageLayout]:
        grid = inputs.get(f"{kind}_grid_thw")
        if grid is None:
            raise ValueError(f"{kind}_grid_thw is required to lay out Qwen {kind} tokens")
        out = [frames_layout(t, h // merge, w // merge, kind == "video") for t, h, w in grid.tolist()]
        got = [lay.num_tokens for lay in out]
        if got != list(lengths):
            raise RuntimeError(f"Qwen {kind} layout has {got} tokens per item but the model produced {lengths}")
        return out

    return layouts


def _window_order(visual: nn.Module, grid: torch.Tensor) -> torch.Tensor | None:
    """Qwen2.5-VL's tower runs on merged units permuted into windows (``window_index``) and
    un-permutes after the merger with ``argsort(window_index)``: that inverse, or None for towers
    without windows."""
    if not hasattr(visual, "window_size"):
        return None
    try:
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
    except ImportError:  # transformers before vision_utils
        window_index, _ = visual.get_window_index(grid)
    return torch.argsort(window_index)


def per_merged_unit(
    values: torch.Tensor, unit: int, order: torch.Tensor | None, sizes: list[int]
) -> list[torch.Tensor]:
    """Per-patch values of a packed tower call (N, ...) as per-item values of its merged units in the
    LLM's order: averaged over each unit's ``unit`` consecutive patches, un-permuted by ``order`` (the
    inverse window permutation, None without windows) and split into items of ``sizes`` units."""
    units = values.reshape(-1, unit, *values.shape[1:]).mean(1)
    if order is not None:
        units = units[order.to(units.device)]
    return list(units.split(sizes))


def packed_scorers(visual: nn.Module):
    """Scores of the packed tower from one encoder call's captured blocks, one tensor per image or
    video, per merged unit in the LLM's order. ``received_attention(layer, heads)``: the attention
    each patch receives at block ``layer`` (softmax over keys, mean over the queries of its image,
    or window in a windowed block; mean or sum over heads), averaged over the 2x2 patches of each
    merged unit after undoing the window permutation — the CLS-free score that LightCompress and
    VisionZip's Qwen port use. ``keys(layer)``: the block's head-averaged keys (before RoPE), averaged
    per merged unit."""
    unit = visual.spatial_merge_size**2
    rope = importlib.import_module(type(visual).__module__).apply_rotary_pos_emb_vision

    def build(capture: dict) -> dict:
        inputs = capture["inputs"]
        grid = inputs.get("image_grid_thw", inputs.get("video_grid_thw"))

        def per_unit(values: torch.Tensor) -> list[torch.Tensor]:
            return per_merged_unit(values, unit, _window_order(visual, grid), (grid.prod(-1) // unit).tolist())

        def qk(layer: int):
            kw = capture.get(("kwargs", layer))
            if kw is None:
                raise RuntimeError(f"encoder block {layer} was not captured; list it in the stage's capture")
            attn, h = visual.blocks[layer].attn, kw["hidden_states"]
            q, k, _ = attn.qkv(h).reshape(h.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            return attn, kw, q, k

        def received_attention(layer: int, heads: str = "mean") -> list[torch.Tensor]:
            attn, kw, q, k = qk(layer)
            q, k = rope(q, k, *kw["position_embeddings"])
            got = segment_received_attention(q.transpose(0, 1), k.transpose(0, 1), kw["cu_seqlens"].tolist(),
                                             attn.scaling)
            return per_unit(got.sum(0) if heads == "sum" else got.mean(0))

        def keys(layer: int) -> list[torch.Tensor]:
            return per_unit(qk(layer)[3].mean(1))

        return {"received_attention": received_attention, "keys": keys}

    return build


def _packed_tower(visual: nn.Module) -> VisionParts:
    full = getattr(visual, "fullatt_block_indexes", None)
    return VisionParts(
        layers=visual.blocks,
        attention=lambda block: block.attn,
        input_norm=lambda block: block.norm1,
        has_cls=False,
        grid=(0, 0),  # no fixed grid: every image has its own
        mlp_norm=lambda block: block.norm2,
        mlp=lambda block: block.mlp,
        tower="packed",
        vision_site=PACKED,
        scorers=packed_scorers(visual),
        full_attention=tuple(full) if full is not None else None,
    )


def qwen_anatomy(model: nn.Module, name: str) -> Anatomy:
    """Anatomy of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model."""
    core = model if hasattr(model, "visual") else model.model
    cfg = core.config
    merge = int(cfg.vision_config.spatial_merge_size)
    rope_params = set(inspect.signature(core.get_rope_index).parameters)

    def original_positions(inputs: dict) -> torch.Tensor:
        ids = inputs["input_ids"]
        grids = [inputs.get(k) for k in ("image_grid_thw", "video_grid_thw")]
        if inputs.get("mm_token_type_ids") is None or all(g is None for g in grids):
            # what the model does without them: the 1-D position on all three axes
            return torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1).expand(3, ids.shape[0], -1)
        extra = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask")
        pos, deltas = core.get_rope_index(ids, **{k: inputs.get(k) for k in extra if k in rope_params})
        core.rope_deltas = deltas  # as the model's own forward stores them for decoding
        return pos

    def continuation(past: int, q: int, batch: int, device) -> torch.Tensor:
        pos = torch.arange(past, past + q, device=device).view(1, -1).expand(batch, -1)
        if core.rope_deltas is not None:
            pos = pos + core.rope_deltas.to(device)
        return pos[None].expand(3, -1, -1)

    def encoder(kind: str):
        def encode(inputs: dict):
            pixels = inputs["pixel_values" if kind == "image" else "pixel_values_videos"]
            return getattr(core, f"get_{kind}_features")(pixels, inputs.get(f"{kind}_grid_thw"), return_dict=True)

        return encode

    deepstack = ("deepstack_features",) if hasattr(core.visual, "deepstack_merger_list") else ()
    modalities = tuple(
        Modality(kind, int(token), (pixels,), f"get_{kind}_features", encoder(kind), _layouts(kind, merge), deepstack)
        for kind, token, pixels in (
            ("image", cfg.image_token_id, "pixel_values"),
            ("video", cfg.video_token_id, "pixel_values_videos"),
        )
    )
    llm: LLMParts = llm_parts(core.language_model)
    if hasattr(llm.attention(llm.layers[0]), "q_norm"):  # Qwen3: RMS norm per head on queries and keys
        llm.head_norms = lambda attn: (attn.q_norm, attn.k_norm)
    if hasattr(core.language_model, "_deepstack_process"):  # Qwen3: deepstack features after layers 0..n-1
        llm.injections = ((core.language_model, "_deepstack_process"),)
    return Anatomy(
        name=name,
        model=model,
        vision=_packed_tower(core.visual),
        llm=llm,
        vlm_core=core,
        image_token_id=int(cfg.image_token_id),
        feature_layer=None,
        sequence=Sequence(
            modalities,
            per_token=("mm_token_type_ids",),
            positions="mrope",
            original_positions=original_positions,
            continuation=continuation,
        ),
        pad_token_id=int(getattr(cfg.text_config, "pad_token_id", None) or 0),
    )
