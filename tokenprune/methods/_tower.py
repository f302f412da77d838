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
