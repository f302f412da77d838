"""Analytic FLOPs of a (pruned) LLaVA-style or Qwen-VL model, per stage, from its config and a prefill trace.

Convention (stated once, used everywhere in tokenprune):

* Counts are **MACs** (multiply-accumulates); ``FLOPs = 2 x MACs``. ``FlopCounterMode`` reports FLOPs.
* One decoder layer on ``n`` tokens costs (PyramidDrop's form of FastV's formula, 3ndm for gated MLPs)::

      n*d*(d_q + 2*d_kv) + n*d_q*d      # q, k, v, o projections (GQA: d_kv = kv_heads * head_dim)
    + 2 * n * n_ctx * d_q               # Q K^T and A V (no causal discount, as FlopCounterMode)
    + g * n * d * m                     # MLP: g = 3 (gate/up/down, SwiGLU) or 2 (fc1/fc2)

  With multi-head attention (``d_q = d_kv = d``) the first line is FastV's ``4nd^2``. GQA shrinks the
  k/v projections; we count them **as they are** (``convention="exact"``, the default, which the
  ``FlopCounterMode`` cross-check test uses). ``convention="paper"`` counts ``4nd^2`` regardless of GQA,
  to compare with the FastV / PyramidDrop tables.
* Stages: ``vision`` (patch embedding + encoder layers, every tile; on Qwen's packed tower every
  image / video at its own resolution, attention per image in full-attention blocks and per window
  in windowed ones), ``projector`` (Qwen: the 2x2 merger, and Qwen3-VL's deepstack mergers), ``llm_prefill``
  (decoder layers only, like the papers), ``lm_head`` (logits of the last prompt token, as ``generate``
  computes) and ``decode_per_token`` (one generated token: layers + LM head, mean over the new tokens).
* Not counted (nor by the papers): norms, RoPE, softmax, activations, embeddings lookups, biases.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

GATED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "vicuna",
                     "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text")


@dataclass(frozen=True)
class DecoderGeometry:
    """Shapes that set one decoder (or encoder) layer's cost."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    gated: bool = True
    vocab: int = 0

    @property
    def d_q(self) -> int:
        return self.heads * self.head_dim

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, cfg: Any, gated: bool | None = None) -> DecoderGeometry:
        """From a transformers text config (Llama-style names); ``gated`` defaults by ``model_type``."""
        heads = int(cfg.num_attention_heads)
        hidden = int(cfg.hidden_size)
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        if gated is None:
            gated = getattr(cfg, "model_type", "llama") in GATED_MODEL_TYPES
        return cls(
            hidden=hidden,
            ffn=int(cfg.intermediate_size),
            heads=heads,
            kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            layers=int(cfg.num_hidden_layers),
            gated=bool(gated),
            vocab=int(getattr(cfg, "vocab_size", 0) or 0),
        )


def layer_macs(geo: DecoderGeometry, n: float, n_ctx: float | None = None, convention: str = "exact") -> float:
    """MACs of one layer processing ``n`` query tokens against ``n_ctx`` keys (default ``n``)."""
    if convention not in ("exact", "paper"):
        raise ValueError(f"convention: expected 'exact' or 'paper', got {convention!r}")
    n_ctx = n if n_ctx is None else n_ctx
    d = geo.hidden
    if convention == "paper":
        proj = 4 * n * d * d
    else:
        proj = n * d * (geo.d_q + 2 * geo.d_kv) + n * geo.d_q * d
    attn = 2 * n * n_ctx * geo.d_q
    mlp = (3 if geo.gated else 2) * n * d * geo.ffn
    return float(proj + attn + mlp)


def prefill_macs(geo: DecoderGeometry, tokens_per_layer: list[float], convention: str = "exact") -> float:
    """Decoder-layer MACs of one prefill where layer ``j`` sees ``tokens_per_layer[j]`` tokens."""
    if len(tokens_per_layer) != geo.layers:
        raise ValueError(f"tokens_per_layer: expected {geo.layers} entries, got {len(tokens_per_layer)}")
    return sum(layer_macs(geo, n, convention=convention) for n in tokens_per_layer)


def decode_macs(geo: DecoderGeometry, cache_per_layer: list[float], new_tokens: int = 1,
                convention: str = "exact") -> float:
    """Mean MACs of one decoded token (layers + LM head) over ``new_tokens`` steps after a prefill that
    left ``cache_per_layer[j]`` entries in layer ``j``'s KV cache."""
    if new_tokens < 1:
        return 0.0
    total = 0.0
    for t in range(new_tokens):
        total += sum(layer_macs(geo, 1, c + t + 1, convention) for c in cache_per_layer)
    return total / new_tokens + geo.hidden * geo.vocab


@dataclass
class FlopsBreakdown:
    """MACs per stage for one sample (see the module docstring for what each stage covers)."""

    vision: float = 0.0
    projector: float = 0.0
    llm_prefill: float = 0.0
    lm_head: float = 0.0
    decode_per_token: float = 0.0
    llm_tokens_per_layer: list[float] = field(default_factory=list)
    unit: str = "MACs"
    convention: str = "exact"

    @property
    def prefill_total(self) -> float:
        """Everything up to the first token's logits: vision + projector + LLM prefill + LM head."""
        return self.vision + self.projector + self.llm_prefill + self.lm_head

    def total(self, new_tokens: int) -> float:
        """Prefill plus ``new_tokens - 1`` decode steps (the first token comes from the prefill)."""
        return self.prefill_total + max(0, new_tokens - 1) * self.decode_per_token

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prefill_total"] = self.prefill_total
        return d


def _vision_geometry(vcfg: Any) -> tuple[DecoderGeometry, int, int, bool]:
    """(encoder geometry, patch tokens per tile, patch-embedding MACs per tile, has CLS)."""
    geo = DecoderGeometry(
        hidden=int(vcfg.hidden_size),
        ffn=int(vcfg.intermediate_size),
        heads=int(vcfg.num_attention_heads),
        kv_heads=int(vcfg.num_attention_heads),
        head_dim=int(vcfg.hidden_size) // int(vcfg.num_attention_heads),
        layers=int(vcfg.num_hidden_layers),
        gated=False,
    )
    grid = int(vcfg.image_size) // int(vcfg.patch_size)
    n_patch = grid * grid
    channels = int(getattr(vcfg, "num_channels", 3))
    embed = n_patch * channels * int(vcfg.patch_size) ** 2 * geo.hidden
    has_cls = getattr(vcfg, "model_type", "") in ("clip_vision_model", "clip")
    return geo, n_patch, embed, has_cls


def tiles_per_sample(model: Any, inputs: dict[str, Any]) -> list[int]:
    """Vision-tower passes per sample: images for LLaVA, base + anyres tiles for LLaVA-NeXT."""
    ids = inputs["input_ids"]
    cfg = model.config
    image_sizes = inputs.get("image_sizes")
    if image_sizes is not None and getattr(cfg, "image_grid_pinpoints", None) is not None:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        per_image = [
            int(image_size_to_num_patches(tuple(int(v) for v in s), cfg.image_grid_pinpoints,
                                          cfg.vision_config.image_size))
            for s in image_sizes
        ]
        # one image per sample is the LLaVA-NeXT processor's layout for a batch of single-image prompts
        if len(per_image) == ids.shape[0]:
            return per_image
        return [sum(per_image) // ids.shape[0]] * ids.shape[0]
    pv = inputs.get("pixel_values")
    n_img = pv.shape[0] if pv is not None else 0
    return [n_img // ids.shape[0]] * ids.shape[0]


def _linear_macs(module: Any) -> int:
    """MACs per token of every ``nn.Linear`` inside ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def packed_vision_macs(model: Any, inputs: dict[str, Any]) -> list[tuple[float, float]]:
    """(vision, projector) MACs per sample of a Qwen-style packed tower: per image / video of
    ``t x h x w`` patches, the patch embedding, every block's linears on all patches plus Q K^T and
    A V within each attention chunk (an image frame in full-attention blocks, a window in windowed
    ones, as the tower's own ``cu_seqlens`` say), and the merger(s) on the 2x2 units."""
    from transformers.vision_utils import get_vision_window_index

    core = model.model if hasattr(model, "model") else model
    visual = core.visual
    unit = visual.spatial_merge_size**2
    conv = visual.patch_embed.proj
    embed = conv.in_channels * math.prod(conv.kernel_size) * conv.out_channels
    dim = conv.out_channels
    full = getattr(visual, "fullatt_block_indexes", None)
    mergers = [visual.merger, *getattr(visual, "deepstack_merger_list", [])]
    merge = sum(_linear_macs(m) for m in mergers)

    def item(thw: torch.Tensor) -> tuple[float, float]:
        t, h, w = (int(v) for v in thw)
        n = t * h * w
        frames = [h * w] * t
        windows = frames
        if hasattr(visual, "window_size"):
            _, cu = get_vision_window_index(thw[None], spatial_merge_size=visual.spatial_merge_size,
                                            window_size=visual.window_size, patch_size=visual.patch_size)
            windows = torch.as_tensor(cu).diff().tolist()
        vision = float(n * embed)
        for j, block in enumerate(visual.blocks):
            chunks = frames if full is None or j in full else windows
            vision += n * _linear_macs(block) + 2 * dim * sum(c * c for c in chunks)
        return vision, float(n // unit * merge)

    ids = inputs["input_ids"]
    out = [[0.0, 0.0] for _ in range(ids.shape[0])]
    cfg = core.config
    for kind, token in (("image", cfg.image_token_id), ("video", cfg.video_token_id)):
        grid = inputs.get(f"{kind}_grid_thw")
        if grid is None:
            continue
        lengths = (grid.prod(-1) // unit).tolist()
        counts, i = (ids == token).sum(-1).tolist(), 0
        for b, count in enumerate(counts):
            while count > 0 and i < len(lengths):
                v, p = item(grid[i])
                out[b][0] += v
                out[b][1] += p
                count -= lengths[i]
                i += 1
    return [(v, p) for v, p in out]


def estimate(model: Any, inputs: dict[str, Any], trace: Any = None, new_tokens: int = 1,
             convention: str = "exact") -> list[FlopsBreakdown]:
    """Per-sample MACs of ``model`` (LLaVA / LLaVA-NeXT) on ``inputs`` (processor output).

    ``trace`` (``handle.trace`` after the prefill, or None when unpruned) gives the visual tokens
    entering each decoder layer; text tokens are the non-image, non-padding prompt tokens. Vision-site
    stages reduce the encoder's tokens from their layer on (CLS kept).
    """
    cfg = model.config
    tcfg = cfg.get_text_config()
    geo = DecoderGeometry.from_config(tcfg)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    packed = hasattr(getattr(model, "model", model), "visual")  # Qwen: packed tower, images and videos
    placeholders = [cfg.image_token_id] + ([cfg.video_token_id] if packed else [])
    is_img = torch.isin(ids, torch.tensor(placeholders, device=ids.device)) & real
    if packed:
        tower = packed_vision_macs(model, inputs)
    else:
        vgeo, n_patch, embed, has_cls = _vision_geometry(cfg.vision_config)
    n_text = (real & ~is_img).sum(-1).tolist()
    n_vis = is_img.sum(-1).tolist()
    if not packed:
        tiles = tiles_per_sample(model, inputs)
        strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        cls_off = int(has_cls and strategy == "full")
        vfl = getattr(cfg, "vision_feature_layer", -2)
        n_feat_layers = 1 if isinstance(vfl, int) else len(vfl)
        proj_in = vgeo.hidden * n_feat_layers
    vision_stages = [st for st in (trace.stages if trace is not None else []) if st.site == "vision"]
    out = []
    for b in range(ids.shape[0]):
        if trace is not None:
            visual = [float(trace.tokens_entering(j)[b]) for j in range(geo.layers)]
        else:
            visual = [float(n_vis[b])] * geo.layers
        per_layer = [n_text[b] + v for v in visual]
        if packed:
            vision, projector = tower[b]
        else:
            vision, projector = _batched_vision(vgeo, n_patch, embed, has_cls, cls_off, tiles[b], proj_in, geo,
                                                vision_stages, b)
        out.append(FlopsBreakdown(
            vision=float(vision),
            projector=float(projector),
            llm_prefill=prefill_macs(geo, per_layer, convention),
            lm_head=float(geo.hidden * geo.vocab),
            decode_per_token=decode_macs(geo, per_layer, new_tokens, convention),
            llm_tokens_per_layer=per_layer,
            convention=convention,
        ))
    return out


def _batched_vision(vgeo: DecoderGeometry, n_patch: int, embed: int, has_cls: bool, cls_off: int, tiles: int,
                    proj_in: int, geo: DecoderGeometry, vision_stages: list, b: int) -> tuple[float, float]:
    """(vision, projector) MACs of sample ``b`` on a CLIP/SigLIP tower: tokens entering each encoder
    layer per tile (vision-site stages reduce them from their layer on), then the projector."""
    enc = [float(n_patch + int(has_cls))] * vgeo.layers
    proj_tokens = float(tiles * (n_patch + cls_off))
    for st in vision_stages:
        kept = float(st.counts[b]) - cls_off + int(has_cls)
        for j in range(st.layer, vgeo.layers):
            enc[j] = kept
        proj_tokens = float(st.counts[b])
    vision = tiles * (embed + sum(layer_macs(vgeo, n) for n in enc)) if tiles else 0.0
    projector = proj_tokens * (proj_in * geo.hidden + geo.hidden * geo.hidden) if tiles else 0.0
    return float(vision), float(projector)


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu`` (missing from torch's registry):
    2 x (Q K^T + A V) MACs over the query heads, no causal discount, like ``sdpa_flop_count``."""
    b, h, s_q, d = query_shape
    s_k = key_shape[-2]
    d_v = value_shape[-1]
    return 2 * b * h * s_q * s_k * (d + d_v)


def flop_counter(display: bool = False) -> Any:
    """A ``torch.utils.flop_counter.FlopCounterMode`` that also counts CPU SDPA (which stock torch
    builds count as 0 FLOPs: ``_scaled_dot_product_flash_attention_for_cpu`` has no formula)."""
    from torch.utils.flop_counter import FlopCounterMode

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {op: _sdpa_cpu_flops} if op is not None else {}
    return FlopCounterMode(display=display, custom_mapping=mapping)
