"""vLLM's Qwen2.5-VL with tokenprune's pre-LLM methods, registered under the stock architecture name
(the shared machinery is in ``model.py``).

What differs from LLaVA, as in tokenprune's Hugging Face adapter (``adapters/qwen.py``):

* a visual token is one 2x2 merged unit; an image's tokens lie on its (h/2) x (w/2) merged grid, and
  Qwen's processor (not ``get_num_image_tokens``) sizes its placeholders: the processor here cuts the
  stock replacement to the kept count;
* the tower is packed (every image of an encoder call in one sequence) with windowed blocks and no
  CLS token: the stage reads ``received_attention`` (the attention each patch receives, mean over the
  queries of its image or window) and ``keys``, averaged per merged unit in the LLM's order, computed
  from the captured blocks with vLLM's own projections and rotary embedding;
* positions are already M-RoPE (3, L): each kept token carries its (t, h, w) offset from the image's
  start, which the model adds to the placeholder positions (``positions.py``).

Videos are not pruned: while pruning, the engine must be started with ``limit_mm_per_prompt`` 0 for
``video`` (refused at engine start otherwise, ``config_hook.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache, cached_property
from pathlib import Path

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ..adapters.base import ImageLayout
from ..adapters.qwen import per_merged_unit
from ..core.scoring import segment_received_attention
from ..errors import SiteError
from .config_hook import spec_of
from .context import PackedCapture
from .model import PrunedModel, all_reduce, kept_count
from .positions import encode_offsets


@cache
def _fixture_processor() -> type:
    """The bundled fixture's processor class, its video token named by the id it stands for (the
    tokenizer's unknown token: the fixture has no video token, which vLLM's prompt updates look up)."""
    from ..demo.build import ImageOnlyQwen2_5_VLProcessor

    class FixtureProcessor(ImageOnlyQwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
            super().__init__(image_processor, tokenizer, chat_template, **kwargs)
            self.video_token = tokenizer.unk_token

    return FixtureProcessor


class TokenpruneQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    """Stock processing info; for tokenprune's bundled fixture folder, its image-only processor."""

    @cached_property
    def _bundled(self) -> bool:
        from ..demo import checkpoint_path

        try:
            return Path(self.ctx.model_config.model).resolve() == checkpoint_path("qwen2_5_vl").resolve()
        except OSError:
            return False

    def get_hf_processor(self, **kwargs: object):
        """The bundled fixture ships ``ImageOnlyQwen2_5_VLProcessor`` (Qwen's processor without the video
        processor, which needs torchvision); vLLM's stock class would look for a video processor config."""
        if self._bundled:
            return self.ctx.get_hf_processor(_fixture_processor(), **kwargs)
        return super().get_hf_processor(**kwargs)

    def get_supported_mm_limits(self):
        return {"image": None} if self._bundled else super().get_supported_mm_limits()


class TokenpruneQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """An image's placeholders: what the method keeps of its merged grid (user-supplied embeddings: all)."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        spec = spec_of(self.info.get_hf_config())
        if spec is None or spec.keeps_everything:
            return updates

        def kept(update: PromptReplacement) -> PromptReplacement:
            if update.modality != "image":
                return update
            stock = update.replacement

            def replacement(item_idx: int):
                tokens = stock(item_idx)
                item = out_mm_kwargs["image"][item_idx]
                if "image_embeds" in item:
                    return tokens
                grid = tuple(int(v) for v in item["image_grid_thw"].data)
                return tokens[: kept_count(spec, len(tokens), ("image_grid_thw", grid))]

            return PromptReplacement(modality=update.modality, target=update.target, replacement=replacement)

        return [kept(u) for u in updates]


@MULTIMODAL_REGISTRY.register_processor(
    TokenpruneQwen2_5_VLMultiModalProcessor,
    info=TokenpruneQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class TokenpruneQwen2_5_VLForConditionalGeneration(PrunedModel, Qwen2_5_VLForConditionalGeneration):
    """Stock vLLM Qwen2.5-VL plus tokenprune's pre-LLM stage (active when the config has a ``tokenprune`` entry)."""

    position_axes = 3

    def _install_capture(self, layers: Sequence[int]) -> PackedCapture:
        visual = self.visual
        blocks = visual.blocks
        inputs, calls = self._captured
        depth = len(blocks)
        for layer in sorted({c % depth for c in layers}):

            def keep_input(mod, args, kwargs, layer=layer):
                inputs[layer] = (args[0] if args else kwargs["x"], kwargs)

            blocks[layer].attn.register_forward_pre_hook(keep_input, with_kwargs=True)

        def keep_grid(mod, args, kwargs):
            calls["grid"] = [list(map(int, g)) for g in (args[1] if len(args) > 1 else kwargs["grid_thw"])]

        visual.register_forward_pre_hook(keep_grid, with_kwargs=True)
        unit = visual.spatial_merge_size**2
        num_heads = int(self.config.vision_config.num_heads)
        reduce = all_reduce if getattr(blocks[0].attn, "tp_size", 1) > 1 else (lambda t: t)

        def qk(layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
            """This process's queries and keys after rotary embedding and keys before it, (s, h, d) each."""
            if layer % depth not in inputs:
                raise SiteError(f"layer: encoder block {layer} was not captured; list it in the stage's capture")
            x, kw = inputs[layer % depth]
            attn = blocks[layer % depth].attn
            qkv, _ = attn.qkv(x)  # (s, 1, 3 * h * d): (three, head, head_dim), as the block splits it
            s = qkv.shape[0]
            qkv = qkv.view(s, 3, attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head)
            raw_k = qkv[:, 1]
            both = qkv[:, :2].permute(1, 0, 2, 3).contiguous()  # (2, s, h, d): the block's "(two b) s head head_dim"
            rotated = attn.apply_rotary_emb(both, kw["rotary_pos_emb_cos"], kw["rotary_pos_emb_sin"])
            return rotated[0], rotated[1], raw_k, kw

        def per_image(values: torch.Tensor) -> list[torch.Tensor]:
            grid = calls["grid"]
            order = visual.prepare_encoder_metadata(grid)["reverse_indices"]
            return per_merged_unit(values, unit, order, [t * h * w // unit for t, h, w in grid])

        def received_attention(layer: int, heads: str = "mean") -> list[torch.Tensor]:
            q, k, _, kw = qk(layer)
            attn = blocks[layer % depth].attn
            got = segment_received_attention(q.transpose(0, 1), k.transpose(0, 1), kw["cu_seqlens"].tolist(),
                                             attn.hidden_size_per_attention_head**-0.5)
            total = reduce(got.sum(0))
            return per_image(total if heads == "sum" else total / num_heads)

        def keys(layer: int) -> list[torch.Tensor]:
            return per_image(reduce(qk(layer)[2].sum(1)) / num_heads)

        return PackedCapture({"received_attention": received_attention, "keys": keys})

    def _geometry(self, image_input, features):
        return {"image_grid_thw": torch.as_tensor(image_input["image_grid_thw"]).cpu()}, [0] * len(features)

    def _offsets(self, layout: ImageLayout, index: torch.Tensor) -> torch.Tensor:
        frame = layout.frame if layout.frame is not None else torch.zeros_like(layout.row)
        return torch.stack([frame[index], layout.row[index], layout.col[index]], -1)  # (t, h, w) on the merged grid

    def _keep_all(self, image_input, features: list[torch.Tensor]) -> list[torch.Tensor]:
        inputs, _ = self._geometry(image_input, features)
        layouts = self._spec.anatomy.layouts([f.shape[0] for f in features], inputs)
        return [encode_offsets(f, self._offsets(lay, torch.arange(f.shape[0]))) for f, lay in zip(features, layouts)]

    def _span(self, data, placeholders: int) -> int:
        """Positions an image spans unpruned: the largest extent of its merged (t, h, w) grid."""
        if "image_grid_thw" not in data:
            raise SiteError("video: tokenprune serves Qwen2.5-VL images only while pruning (limit_mm_per_prompt 0)")
        t, h, w = (int(v) for v in data["image_grid_thw"].data)
        merge = self.visual.spatial_merge_size
        return max(t, h // merge, w // merge)
