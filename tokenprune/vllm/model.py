"""What every served architecture shares: mixins for vLLM's processing info (placeholders per image)
and model class (selection at encoding, original positions). The architecture files say only where
the tower and the per-image features are.

* Prompt processing (:class:`PrunedInfo`): an image expands to the number of tokens the method keeps
  of it, found from its geometry and the budget (``dry_run_counts``).
* Encoding (:meth:`PrunedModel._prune`): the tower's attention inputs and outputs are captured at the
  stage's layers, the pre-LLM context is built, ``stage.select`` chooses, and each kept row carries
  its position shift (``positions.py``).
* Positions: text at its unpruned position, kept image tokens at ``image start + original index``,
  decoding from the unpruned length, as tokenprune's Hugging Face path does.

Without a ``tokenprune`` entry in the config (or at budget 1.0) every method falls through to the
stock class.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence

import torch
from vllm.model_executor.models.utils import WeightsMapper

from ..errors import SiteError
from .config_hook import spec_of
from .context import TowerCapture, dry_run_counts, image_context, select
from .positions import decode_shifts, encode_shifts, prompt_positions
from .spec import ServeSpec

TRACE_LENGTH = 1024
# transformers >= 5 saves a LLaVA's CLIP tower directly under ``vision_tower.`` (tokenprune's bundled
# fixtures); vLLM reads the llava-hf layout ``vision_tower.vision_model.``. Names already in that layout,
# and other towers (Pixtral), do not match.
TOWER_NAMES = WeightsMapper(
    orig_to_new_regex={
        re.compile(r"^((?:model\.)?vision_tower\.)(?=(?:embeddings|encoder|pre_layrnorm|post_layernorm)\.)"): (
            r"\1vision_model."
        )
    }
)
_COUNTS: dict[tuple[int, int, tuple[int, ...] | None], int] = {}


def kept_count(spec: ServeSpec, n: int, image_size: tuple[int, int] | None = None) -> int:
    """Tokens the method keeps of an image of ``n`` visual tokens (``image_size`` (height, width)
    where the layout depends on it, as LLaVA-NeXT's), cached per spec and geometry."""
    key = (id(spec), n, image_size)
    if key not in _COUNTS:
        sizes = None if image_size is None else torch.tensor([image_size])
        _COUNTS[key] = dry_run_counts(spec.stage, spec.anatomy.layouts([n], {"image_sizes": sizes}))[0]
    return _COUNTS[key]


class PrunedInfo:
    """Mixin for a vLLM ``ProcessingInfo``: ``get_num_image_tokens`` counts kept tokens."""

    layout_needs_size = False

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        spec = spec_of(self.get_hf_config())
        if spec is None or spec.keeps_everything:
            return n
        return kept_count(spec, n, (image_height, image_width) if self.layout_needs_size else None)


class PrunedModel:
    """Mixin for a vLLM multimodal model class (listed before it). Subclasses set ``stock_info`` (the
    stock processing-info class, which counts an image's unpruned tokens), call
    :meth:`_tokenprune_init` after the stock ``__init__`` and route their per-image features through
    :meth:`_prune`."""

    stock_info: type

    def _tokenprune_init(self, vllm_config) -> None:
        from vllm.multimodal.processing.context import InputProcessingContext

        self._counter = self.stock_info(InputProcessingContext(vllm_config.model_config, None))
        spec = spec_of(self.config)
        self._spec = None if spec is None or spec.keeps_everything else spec
        self._shift: torch.Tensor | None = None  # this step's per-token position shifts (kept image tokens)
        self._captured: tuple[dict, dict] = ({}, {})
        self.kept_trace: deque[list[int]] = deque(maxlen=TRACE_LENGTH)  # kept original indices, per encoded image
        if self._spec is not None:
            self._capture = self._install_capture(self._spec.stage.capture)

    # --- encoding -------------------------------------------------------------------------------
    def _install_capture(self, layers: Sequence[int]) -> TowerCapture:
        tower = self.vision_tower
        encoder = getattr(tower, "vision_model", tower).encoder.layers
        inputs, outputs = self._captured
        depth = self._spec.anatomy.vision.num_layers
        for layer in sorted({c % depth for c in layers}):
            if layer >= len(encoder):
                raise SiteError(
                    f"layer: encoder layer {layer} lies past the feature layer; vLLM builds only "
                    f"{len(encoder)} layers of this tower"
                )
            block = encoder[layer]

            def keep_input(mod, args, kwargs, layer=layer):
                inputs[layer] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

            def keep_output(mod, args, out, layer=layer):
                outputs[layer] = out

            block.self_attn.register_forward_pre_hook(keep_input, with_kwargs=True)
            block.register_forward_hook(keep_output)
        attn = encoder[0].self_attn

        def heads(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
            mod = encoder[layer % depth].self_attn
            qkv, _ = mod.qkv_proj(inputs[layer % depth])
            q, k, _ = qkv.chunk(3, dim=-1)
            t, s, _ = k.shape
            k = k.view(t, s, mod.num_heads_per_partition, mod.head_dim).transpose(1, 2)
            q = q[:, :1].view(t, 1, mod.num_heads_per_partition, mod.head_dim).transpose(1, 2)
            return q, k

        reduce = (lambda x: x) if getattr(attn, "tp_size", 1) == 1 else _all_reduce
        vision = self._spec.anatomy.vision
        return TowerCapture(heads, outputs, attn.num_heads, attn.scale, vision.has_cls, vision.grid, reduce)

    def _clear_capture(self) -> None:
        for store in self._captured:
            store.clear()

    def _prune(
        self, features: list[torch.Tensor], image_sizes: torch.Tensor | None, first_rows: list[int]
    ) -> list[torch.Tensor]:
        """Kept rows (with their position shifts) of each image's features (N_b, H), in the order they
        would reach the LLM; ``image_sizes`` (B, 2) as (height, width) where the layout needs them;
        ``first_rows[b]`` is the tower row (crop) of image b's base crop, its tiles following it."""
        layouts = self._spec.anatomy.layouts([f.shape[0] for f in features], {"image_sizes": image_sizes})
        rows = [first + lay.tile.clamp(min=0) for first, lay in zip(first_rows, layouts)]
        ctx = image_context(features, layouts, rows, self._capture, self.multi_modal_projector)
        try:
            kept, chosen = select(self._spec.stage, ctx)
        finally:
            self._clear_capture()
        out = []
        for b, f in enumerate(features):
            k = int((kept[b] >= 0).sum())
            size = None if image_sizes is None else tuple(int(v) for v in image_sizes[b])
            expected = kept_count(self._spec, f.shape[0], size)
            if k != expected:
                raise RuntimeError(
                    f"{self._spec.method.name} kept {k} tokens of an image where its placeholders hold {expected}: "
                    "its count depends on the image content, which vLLM cannot serve"
                )
            out.append(encode_shifts(chosen[b, :k].to(f.dtype), kept[b, :k]))
            self.kept_trace.append(kept[b, :k].tolist())
        return out

    def _keep_all(self, embeds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """User-supplied image embeddings (their placeholders were sized from them): all kept, no shift."""
        return [encode_shifts(e, torch.arange(e.shape[0])) for e in embeds]

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if self._spec is None or not multimodal_embeddings:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        embeds, shifts = zip(*(decode_shifts(e) for e in multimodal_embeddings))
        shift = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        shift[is_multimodal] = torch.cat(shifts).to(shift.device)
        self._shift = shift
        return super().embed_input_ids(input_ids, list(embeds), is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        shift, self._shift = self._shift, None
        if shift is not None:
            positions = positions.clone()
            positions[..., : shift.shape[0]] += shift
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    # --- positions --------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """Called for every request while pruning is on (the config hook routes positions through
        vLLM's M-RoPE path): text at its unpruned positions, decode delta = pruned tokens."""
        images = []
        for f in mm_features:
            kept = f.mm_position.length
            data = f.data or {}
            full = kept if "image_embeds" in data else self._full_count(data)
            images.append((f.mm_position.offset, kept, full))
        return prompt_positions(len(input_tokens), images)

    def _full_count(self, data) -> int:
        """Unpruned visual tokens of one image, counted by the stock processing info from the image
        size in its processed inputs (the tower's input size when there is none, as LLaVA-1.5's)."""
        size = data.get("image_sizes") if hasattr(data, "get") else None
        if size is None:
            side = self._counter.get_vision_encoder_info().get_image_size()
            height = width = side
        else:
            height, width = (int(v) for v in getattr(size, "data", size))
        return self._counter.get_num_image_tokens(image_width=width, image_height=height)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(t.contiguous())
