"""Where a VLM's image features come from in its vision tower (shared by the vision-stage methods)."""

from __future__ import annotations

from ..adapters.base import Anatomy


def feature_layers(anatomy: Anatomy) -> list[int]:
    """0-based encoder layers whose outputs the VLM takes as image features (``vision_feature_layer``
    indexes ``hidden_states``, whose entry 0 is the embeddings): ``-2`` on a 24-layer CLIP is layer 22.
    A standalone encoder's features are its last layer's output."""
    depth = anatomy.vision.num_layers
    fl = anatomy.feature_layer if anatomy.is_vlm and anatomy.feature_layer is not None else -1
    layers = [fl] if isinstance(fl, int) else list(fl)
    return [max(0, (h % (depth + 1)) - 1) for h in layers]


def attention_score(anatomy: Anatomy) -> str:
    """The encoder attention score a CLS-attention method reads: ``"cls_attention"`` where the
    tower has a CLS token, else ``"received_attention"`` (the attention each token receives, mean
    over the queries of its image: the CLS-free score the methods' own Qwen / SigLIP ports use)."""
    return "cls_attention" if anatomy.vision.has_cls else "received_attention"


def score_layer(anatomy: Anatomy, layer: int) -> int:
    """``layer`` (0-based), or, on towers whose other layers attend within windows (Qwen2.5-VL),
    the last full-attention layer at or before it (the first one if none is)."""
    layer = layer % anatomy.vision.num_layers
    full = anatomy.vision.full_attention
    if full is None or layer in full:
        return layer
    before = [f for f in full if f <= layer]
    return max(before) if before else min(full)
