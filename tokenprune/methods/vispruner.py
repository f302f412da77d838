"""VisPruner — Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective
Token Pruning in VLMs", ICCV 2025 (arXiv 2412.01818), §4.

Algorithm (paper §4.2-4.3; official ``encode_images`` in Theia-4869/VisPruner's ``llava_arch.py``),
per crop (the one image of LLaVA-1.5; the base view and every anyres tile of LLaVA-NeXT), from the
vision tower's feature layer (the layer LLaVA reads, ``vision_feature_layer``, -2 on CLIP-L):

1. *Important tokens*: ``T_imp = int(T * important_ratio)`` (official 0.5) of the crop's ``T`` kept
   tokens, the patches with the largest [CLS] attention at that layer (softmax over CLS + patches,
   the CLS column dropped, not renormalised, mean over heads).
2. *Diverse tokens*: from the rest, in descending CLS-attention order, near-duplicates are removed
   iteratively until ``T - T_imp`` remain: split the current order into even (A) and odd (B)
   positions, score each A token by its largest cosine similarity to a B token (features: the
   layer's output patch tokens, normalised and multiplied in the model's dtype), drop the
   ``r = min(8, R - T_div)`` highest-scoring A tokens; the new order is the surviving A tokens by
   descending score, then B.

``budget`` b keeps ``round(b * n)`` of an image's ``n`` visual tokens (newline and CLS tokens count
in ``n`` and are dropped), split over its crops in proportion to their sizes after LLaVA-NeXT's
unpadding (the official code keeps ``T`` per padded crop, unpads afterwards and keeps every newline).

Deviations — the official loop's crash cases are fixed: it sizes the kept A set as ``R // 2 - r``,
which fails whenever ``R`` is odd (A has ``ceil(R / 2)`` tokens), and it drops nothing it should
when ``r`` exceeds A (keeping ``T - 1`` for some budgets); here A is ``ceil(R / 2)`` tokens and
``r = min(8, R - T_div, |A|)``, which equals the official rule wherever that one runs. Sorting is
stable (ties: earlier first). The diverse half is chaotic (a 1e-6 relative change of the features
changes many of its tokens; fp16 and fp32 differ), so it is computed from the layer's own output in
the model's dtype, deterministically. Kept tokens keep their original position ids (the engine's
convention before the LLM; the official code rebuilds the sequence with contiguous positions).
A tower without a CLS token (SigLIP) is refused at ``patch()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import Anatomy
from ..core.budget import require_budget
from ..core.stage import Context, Stage
from ..errors import MethodArgumentError, SiteError
from ._images import crops, per_image
from ._tower import feature_layers
from .base import Method, register


def remove_duplicates(x: torch.Tensor, order: torch.Tensor, keep: int) -> torch.Tensor:
    """VisPruner's iterative duplicate removal: ``order`` (positions into ``x``, (n, D) features)
    shrunk to ``keep`` tokens; returns the survivors in the loop's final order."""
    xn = x / x.norm(dim=-1, keepdim=True)
    while keep > 0:
        a, b = order[0::2], order[1::2]
        r = min(8, order.numel() - keep, a.numel())
        if r <= 0:
            break
        scores = (xn[a] @ xn[b].transpose(0, 1)).amax(-1)
        order = torch.cat([a[scores.float().argsort(descending=True, stable=True)[r:].to(a.device)], b])
    return order


def vispruner_crop(att: torch.Tensor, x: torch.Tensor, total: int, important_ratio: float) -> torch.Tensor:
    """Kept positions (into the crop's tokens) of one crop: CLS attention ``att`` (n,), features ``x``."""
    n_imp = int(total * important_ratio)
    order = att.float().argsort(descending=True, stable=True).to(x.device)
    diverse = remove_duplicates(x, order[n_imp:], total - n_imp) if total > n_imp else order[:0]
    return torch.cat([order[:n_imp], diverse])


@register
@dataclass
class VisPruner(Method):
    """VisPruner: important tokens by [CLS] attention + diverse tokens by duplicate removal, per crop."""

    name = "vispruner"
    summary = "VisPruner: important tokens by [CLS] attention + diverse tokens by iterative duplicate removal"
    sites = ("pre_llm",)
    needs_cls = True
    important_ratio: float = 0.5

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        budget = require_budget(budget, self.name, "budget=")
        if not 0.0 <= self.important_ratio <= 1.0:
            raise MethodArgumentError(f"important_ratio: must be in [0, 1]; got {self.important_ratio!r}")
        if not anatomy.vision.has_cls:
            raise SiteError(f"method: vispruner ranks tokens by [CLS] attention; the {anatomy.name} vision tower "
                            "has no CLS token")
        layers = feature_layers(anatomy)
        if len(layers) != 1:
            raise SiteError(f"method: vispruner reads one feature layer; this model uses {len(layers)}")
        (layer,) = layers

        def select(ctx: Context) -> torch.Tensor:
            att = ctx.score("cls_attention", layer=layer)
            feats = ctx.get("hidden", layer=layer)

            def choose(b: int, members: torch.Tensor, total: int) -> torch.Tensor:
                kept = [crop[vispruner_crop(att[b, crop], feats[b, crop.to(feats.device)], k,
                                            self.important_ratio).cpu()]
                        for crop, k in crops(ctx, b, members, total) if k > 0]
                return torch.cat(kept) if kept else members[:0]

            return per_image(ctx, budget, choose)

        return [Stage(self.name, "pre_llm", -1, select, capture=(layer,))]
