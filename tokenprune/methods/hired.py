"""HiRED — Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of
High-Resolution Vision-Language Models", AAAI 2025 (arXiv 2408.10945), §3.

Algorithm (paper §3.1-3.2, official ``HiRED_token_selection`` in hasanar1f/HiRED's
``modeling_llava_next.py``), per image, between the projector and the LLM:

1. *Token budget distribution.* The image's budget ``total`` is split between the base image (the
   downscaled full view) and the anyres sub-images: the base image gets ``alpha`` of it (official
   ``alpha = 0.5``), at most its own size. The remaining ``sub`` budget follows where the base
   image's CLS attention at an **early** encoder layer (layer 0) is high: the ``(1 - alpha)`` share
   of base tokens with the highest layer-0 CLS attention are marked, the base image's raster-ordered
   token vector is cut into as many contiguous chunks as there are sub-images (the official
   ``reshape(num_patch_height, num_patch_width, -1)``; not spatial quadrants), and each sub-image
   gets ``sub`` in proportion to the marks in its chunk, at most its own size.
2. *Token selection.* In the base image and in every sub-image, the tokens with the highest CLS
   attention at the **feature layer** (the layer whose output LLaVA reads, official layer 22 of
   CLIP-L/14-336) are kept; CLS attention is summed over heads, as in the official code.
3. Newline tokens are dropped (the official packing passes ``image_newline=None``).

LLaVA-1.5 (one partition): the top ``total`` tokens by feature-layer CLS attention.

Towers without a CLS token (Qwen2-VL / Qwen2.5-VL / Qwen3-VL, SigLIP). Deviation: CLS attention is
replaced by the attention each token *receives* (mean over the queries of its image, summed over
heads), averaged per 2x2 merged unit on Qwen; on Qwen2.5-VL's windowed tower both layers move to
the nearest full-attention block (the last one at or before the layer, else the first), where the
window permutation is undone — the score LightCompress and VisionZip's Qwen port use. Qwen images
are one partition (no anyres tiles): the top ``total`` units by the late score; a video is one
partition too.

``budget`` b: ``total = round(b * n)`` where n is the image's visual-token count as the LLM would
see it unpruned (newline tokens included), so b is exactly the share of visual tokens that reach
the LLM (HiRED's own "20% token budget" counts ``num_patch * 576`` tile patches). Deviations, for
exact budgets: the official code truncates every share with ``int()`` (so it keeps up to a few
tokens fewer than asked); here sub-image shares are rounded by largest remainder, capped at each
sub-image's size, with what a full sub-image cannot take passed to the others. Sub-images are
scored on the tokens LLaVA-NeXT keeps after unpadding (the official code selects on the padded
tile and unpads afterwards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters.base import Anatomy
from ..core.budget import require_budget
from ..core.select import pad_rows
from ..core.stage import Context, Stage
from ..errors import MethodArgumentError
from ._tower import attention_score, feature_layers, score_layer
from .base import Method, register


def apportion(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Split ``total`` over groups in proportion to ``weights`` (largest remainder), never giving a
    group more than its cap; what capped groups cannot take goes to the others."""
    out = [0] * len(weights)
    left, open_ = total, [i for i in range(len(weights)) if caps[i] > 0]
    while left > 0 and open_:
        w = sum(weights[i] for i in open_)
        exact = {i: left * (weights[i] / w if w > 0 else 1 / len(open_)) for i in open_}
        give = {i: min(int(math.floor(exact[i])), caps[i] - out[i]) for i in open_}
        rest = left - sum(give.values())
        for i in sorted(open_, key=lambda i: exact[i] - math.floor(exact[i]), reverse=True):
            if rest > 0 and give[i] < caps[i] - out[i]:
                give[i] += 1
                rest -= 1
        for i in open_:
            out[i] += give[i]
        left -= sum(give.values())
        open_ = [i for i in open_ if out[i] < caps[i]]
    return out


def top(scores: torch.Tensor, members: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` of ``members`` (positions) with the highest ``scores`` (ties: earlier first)."""
    order = scores[members].float().argsort(descending=True, stable=True)
    return members[order[:k]]


@register
@dataclass
class HiRED(Method):
    """HiRED: CLS-attention-guided budget split over anyres partitions, then top-k per partition."""

    name = "hired"
    summary = "HiRED: split the budget over base image / tiles by early CLS attention, top-k by late CLS attention"
    sites = ("pre_llm",)
    alpha: float = 0.5
    early_layer: int = 0
    late_layer: int | None = None

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        budget = require_budget(budget, self.name, "budget=")
        if not 0.0 <= self.alpha <= 1.0:
            raise MethodArgumentError(f"alpha: the base image's share must be in [0, 1]; got {self.alpha!r}")
        late = score_layer(anatomy, self.late_layer if self.late_layer is not None else max(feature_layers(anatomy)))
        early = score_layer(anatomy, self.early_layer)
        score = attention_score(anatomy)

        def select(ctx: Context) -> torch.Tensor:
            early_att = ctx.score(score, layer=early, heads="sum")
            late_att = ctx.score(score, layer=late, heads="sum")
            rows = []
            for b in range(ctx.orig.shape[0]):
                kept = []
                for img in ctx.meta["image"][b][ctx.valid[b]].unique().tolist():
                    members = (ctx.valid[b] & (ctx.meta["image"][b] == img)).nonzero().flatten()
                    total = int(round(budget * members.numel()))
                    kept.append(self.choose(ctx.meta["tile"][b], early_att[b], late_att[b], members, total))
                rows.append(torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long))
            return pad_rows(rows)

        return [Stage(self.name, "pre_llm", -1, select, capture=tuple(sorted({early, late})))]

    def choose(
        self, tile: torch.Tensor, early: torch.Tensor, late: torch.Tensor, members: torch.Tensor, total: int
    ) -> torch.Tensor:
        """Kept positions of one image: ``members`` are its candidate positions, ``tile`` their
        tile ids (0 base, 1.. sub-images, < 0 newline / CLS)."""
        if total >= members.numel():
            return members
        base = members[tile[members] == 0]
        subs = [members[tile[members] == t] for t in sorted(set(tile[members].tolist()) - {0}) if t > 0]
        if not subs:  # LLaVA-1.5: one partition
            return top(late, members[tile[members] >= 0], total)
        full = min(int(total * self.alpha), base.numel())
        sub_total = min(total - full, sum(s.numel() for s in subs))
        marked = top(early, base, int(base.numel() * (1 - self.alpha)))
        # the base image's raster-ordered tokens cut into len(subs) contiguous chunks (official reshape)
        chunk = torch.searchsorted(base, marked) * len(subs) // base.numel()
        marks = torch.bincount(chunk, minlength=len(subs)).tolist()
        shares = apportion(sub_total, [float(m) for m in marks], [s.numel() for s in subs])
        parts = [top(late, base, full)] + [top(late, s, k) for s, k in zip(subs, shares)]
        return torch.cat(parts).sort().values
