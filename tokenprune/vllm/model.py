"""What every served architecture shares: mixins for vLLM's processing info (placeholders per image)
and model class (selection at encoding, original positions). The architecture files say only where
the tower and the per-image features are.

* Prompt processing (:class:`PrunedInfo`): an image expands to the number of tokens the method keeps
  of it, found from its geometry and the budget (``dry_run_counts``).
* Encoding (:meth:`PrunedModel._prune`): the tower's attention inputs and outputs are captured at the
  stage's layers, the pre-LLM context is built, ``stage.select`` chooses, and each kept row carries
  its position offsets from the image's start (``positions.py``).
* Positions: text at its unpruned position, kept image tokens at their original positions (LLaVA:
  ``image start + original index``; Qwen2.5-VL: ``image start + (t, h, w)``), decoding from the
  unpruned length, as tokenprune's Hugging Face path does.

Without a ``tokenprune`` entry in the config (or at budget 1.0) every method falls through to the
stock class.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from functools import cached_property

import torch
from vllm.model_executor.models.utils import WeightsMapper

from ..adapters.base import ImageLayout
from ..errors import SiteError
from .config_hook import spec_of
from .context import PackedCapture, TowerCapture, dry_run_counts, image_context, select
from .positions import decode_offsets, encode_offsets, prompt_positions
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
_COUNTS: dict[tuple, int] = {}


def kept_count(spec: ServeSpec, n: int, geometry: tuple[str, tuple[int, ...]] | None = None) -> int:
    """Tokens the method keeps of an image of ``n`` visual tokens; ``geometry`` is the per-image input
    its layout depends on, as ``(name, value)`` (LLaVA-NeXT: ``("image_sizes", (height, width))``,
    Qwen2.5-VL: ``("image_grid_thw", (t, h, w))``), None where it depends on ``n`` alone. Cached per
    spec and geometry."""
    key = (id(spec), n, geometry)
    if key not in _COUNTS:
        inputs = {"image_sizes": None} if geometry is None else {geometry[0]: torch.tensor([geometry[1]])}
        _COUNTS[key] = dry_run_counts(spec.stage, spec.anatomy.layouts([n], inputs))[0]
    return _COUNTS[key]


class PrunedInfo:
    """Mixin for a vLLM ``ProcessingInfo`` whose ``get_num_image_tokens`` sizes the placeholders:
    it counts kept tokens."""

    layout_needs_size = False

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        spec = spec_of(self.get_hf_config())
        if spec is None or spec.keeps_everything:
            return n
        return kept_count(spec, n, ("image_sizes", (image_height, image_width)) if self.layout_needs_size else None)


class PrunedModel:
    """Mixin for a vLLM multimodal model class (listed before it). An architecture sets
    ``position_axes`` (1: 1-D RoPE; 3: M-RoPE's t, h, w) and implements :meth:`_install_capture`,
    :meth:`_geometry`, :meth:`_offsets`, :meth:`_keep_all` and :meth:`_span`."""

    position_axes = 1

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._model_config = vllm_config.model_config
        spec = spec_of(self.config)
        self._spec = None if spec is None or spec.keeps_everything else spec
        self._shift: torch.Tensor | None = None  # this step's per-token position offsets (kept image tokens)
        self._captured: tuple[dict, dict] = ({}, {})
        self.kept_trace: deque[list[int]] = deque(maxlen=TRACE_LENGTH)  # kept original indices, per encoded image
        if self._spec is not None:
            self._capture = self._install_capture(self._spec.stage.capture)

    # --- per architecture -------------------------------------------------------------------------
    def _install_capture(self, layers: Sequence[int]) -> TowerCapture | PackedCapture:
        """Hooks on the vision tower that keep what the stage's ``capture`` layers saw, and their reader."""
        raise NotImplementedError

    def _geometry(self, image_input, features: list[torch.Tensor]) -> tuple[dict, list[int]]:
        """The per-image inputs the layouts read and the tower row (crop) of each image's base crop."""
        raise NotImplementedError

    def _offsets(self, layout: ImageLayout, index: torch.Tensor) -> torch.Tensor:
        """Position offsets (K, position_axes) from the image's start of its tokens ``index``."""
        raise NotImplementedError

    def _keep_all(self, image_input, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """User-supplied image embeddings (their placeholders were sized from them): all kept, with offsets."""
        raise NotImplementedError

    def _span(self, data, placeholders: int) -> int:
        """Positions one image spans unpruned, from its processed inputs ``data`` (``placeholders``:
        its placeholder count)."""
        raise NotImplementedError

    # --- encoding -------------------------------------------------------------------------------
    def _process_image_input(self, image_input):
        if self._spec is None:
            return super()._process_image_input(image_input)
        features = list(super()._process_image_input(image_input))
        if image_input["type"] == "image_embeds":
            return self._keep_all(image_input, features)
        return self._prune(features, *self._geometry(image_input, features))

    def _clear_capture(self) -> None:
        for store in self._captured:
            store.clear()

    def _prune(self, features: list[torch.Tensor], inputs: dict, first_rows: list[int]) -> list[torch.Tensor]:
        """Kept rows (with their position offsets) of each image's features (N_b, H), in the order they
        would reach the LLM; ``inputs`` holds the per-image inputs the layouts read (``image_sizes``,
        ``image_grid_thw``), ``first_rows[b]`` the tower row of image b's base crop, its tiles following."""
        layouts = self._spec.anatomy.layouts([f.shape[0] for f in features], inputs)
        rows = [first + lay.tile.clamp(min=0) for first, lay in zip(first_rows, layouts)]
        project = getattr(self, "multi_modal_projector", None)
        ctx = image_context(features, layouts, rows, self._capture, project)
        try:
            kept, chosen = select(self._spec.stage, ctx)
        finally:
            self._clear_capture()
        out = []
        for b, (f, lay) in enumerate(zip(features, layouts)):
            k = int((kept[b] >= 0).sum())
            geometry = {name: tuple(int(v) for v in value[b]) for name, value in inputs.items() if value is not None}
            expected = kept_count(self._spec, f.shape[0], next(iter(geometry.items()), None))
            if k != expected:
                raise RuntimeError(
                    f"{self._spec.method.name} kept {k} tokens of an image where its placeholders hold {expected}: "
                    "its count depends on the image content, which vLLM cannot serve"
                )
            out.append(encode_offsets(chosen[b, :k].to(f.dtype), self._offsets(lay, kept[b, :k])))
            self.kept_trace.append(kept[b, :k].tolist())
        return out

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if self._spec is None or not multimodal_embeddings:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        embeds, offsets = zip(*(decode_offsets(e, self.position_axes) for e in multimodal_embeddings))
        shift = torch.zeros(input_ids.shape[0], self.position_axes, dtype=torch.long, device=input_ids.device)
        shift[is_multimodal] = torch.cat(offsets).to(shift.device)
        self._shift = shift
        return super().embed_input_ids(input_ids, list(embeds), is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        shift, self._shift = self._shift, None
        if shift is not None:
            positions = positions.clone()
            positions[..., : shift.shape[0]] += shift.T.to(positions.device)  # (axes, N) onto M-RoPE's (3, N)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    # --- positions --------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """Called for every request while pruning is on: text at its unpruned positions, an image's
        placeholders at its start, decode delta from the unpruned prompt (``positions.py``)."""
        if self._spec is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        images = [(f.mm_position.offset, f.mm_position.length, self._span(f.data or {}, f.mm_position.length))
                  for f in mm_features]
        return prompt_positions(len(input_tokens), images)


class LlavaFamily(PrunedModel):
    """LLaVA / LLaVA-NeXT: a CLIP tower (CLS first, one tower row per crop) and 1-D RoPE. An
    architecture sets ``stock_info``, the stock processing-info class (it counts an image's unpruned
    tokens)."""

    stock_info: type

    @cached_property
    def _counter(self):
        from vllm.multimodal.processing.context import InputProcessingContext

        return self.stock_info(InputProcessingContext(self._model_config, None))

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

        reduce = (lambda x: x) if getattr(attn, "tp_size", 1) == 1 else all_reduce
        vision = self._spec.anatomy.vision
        return TowerCapture(heads, outputs, attn.num_heads, attn.scale, vision.has_cls, vision.grid, reduce)

    def _offsets(self, layout: ImageLayout, index: torch.Tensor) -> torch.Tensor:
        return index.view(-1, 1)  # a token's original index on the one axis

    def _keep_all(self, image_input, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [encode_offsets(f, torch.arange(f.shape[0]).view(-1, 1)) for f in features]

    def _span(self, data, placeholders: int) -> int:
        """Unpruned visual tokens of one image, counted by the stock processing info from the image
        size in its processed inputs (the tower's input size when there is none, as LLaVA-1.5's).
        User-supplied embeddings: their placeholders."""
        if "image_embeds" in data:
            return placeholders
        size = data.get("image_sizes") if hasattr(data, "get") else None
        if size is None:
            side = self._counter.get_vision_encoder_info().get_image_size()
            height = width = side
        else:
            height, width = (int(v) for v in getattr(size, "data", size))
        return self._counter.get_num_image_tokens(image_width=width, image_height=height)


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over the tensor-parallel processes (each holds some of the tower's heads)."""
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(t.contiguous())
