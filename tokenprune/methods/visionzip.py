"""VisionZip — Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
Models", CVPR 2025 (arXiv 2412.04467), §3.2-3.3.

Algorithm (paper §3.2 "dominant token selection" and §3.3 "contextual tokens merging"; official
``visionzip/clip_encoder.py`` and ``utils.py``), per image — per crop (base image and every anyres
tile) on LLaVA-NeXT — at the encoder layer whose output LLaVA reads (layer 22 of CLIP-L/14-336):

1. *Dominant tokens*: the tokens that receive the most CLS attention at that layer (summed over
   heads). The CLS token counts as one of them, as in the official code (``dominant=54`` is CLS +
   53 patches) — here where the model feeds CLS to the LLM (``vision_feature_select_strategy=
   "full"``); with LLaVA's default strategy the CLS never reaches the LLM and its slot goes to the
   next patch.
2. *Contextual tokens*: the remaining tokens, in order; ``contextual`` of them, uniformly strided
   (``step = max(1, n_rest // contextual)``), are targets; every other remaining token joins its
   most similar target by cosine similarity of the layer's head-averaged keys; each contextual token
   is ``target + mean(joined tokens)`` in the encoder's feature space, then goes through the model's
   projector like every other token.

Splits: the paper's 54+10 / 108+20 / 162+30 at 64 / 128 / 192 of 576 tokens, i.e. ``contextual =
round(k * 5 / 32)`` of a crop's k tokens, scaled the same way for other budgets. ``budget`` b keeps
``round(b * n)`` of an image's n visual tokens (newline tokens included in n, never kept: VisionZip
does not re-insert them), split over the crops in proportion to their sizes. Explicit
``dominant`` / ``contextual`` give every crop those counts (the paper's settings), without a budget.

Towers without a CLS token (Qwen2-VL / Qwen2.5-VL / Qwen3-VL). Deviations, as in VisionZip's own
Qwen port and LightCompress: dominant tokens are those that *receive* the most attention (mean over
the queries of their image, summed over heads, averaged per 2x2 merged unit, window permutation
undone; on Qwen2.5-VL at the last full-attention block at or before the feature layer); keys are
averaged per merged unit; the contextual tokens are merged from the projected (merged) features,
since Qwen's projector merges 2x2 units and cannot take one averaged patch.

Placement (engine convention): each contextual token sits in its target patch's slot, so tokens
reach the LLM in raster order with their patches' original position ids; the official code appends
the contextual tokens after the dominant ones with contiguous positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import Anatomy
from ..core.budget import require_budget
from ..core.merge import group_sum, nearest
from ..core.select import allocate, pad_rows_with_features
from ..core.stage import Context, Stage
from ..errors import MethodArgumentError, SiteError
from ._tower import attention_score, feature_layers, score_layer
from .base import Method, register
from .hired import top

CONTEXTUAL_SHARE = 10 / 64  # 54+10, 108+20, 162+30


def contextual_merge(
    hidden: torch.Tensor, keys: torch.Tensor, rest: torch.Tensor, n_ctx: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual tokens from the ``rest`` positions (ascending) of one crop:
    returns the target positions (n_ctx,) and their tokens ``target + mean(joined)`` (n_ctx, D)."""
    n_ctx = min(n_ctx, rest.numel())
    if n_ctx == 0:
        return rest[:0], hidden[:0]
    step = max(1, rest.numel() // n_ctx)
    is_target = torch.zeros(rest.numel(), dtype=torch.bool)
    is_target[torch.arange(0, rest.numel(), step)[:n_ctx]] = True
    targets, others = rest[is_target], rest[~is_target]
    join = nearest(keys[others][None], keys[targets][None])
    summed = group_sum(hidden[others][None], join, n_ctx)[0]
    count = torch.bincount(join[0], minlength=n_ctx).clamp(min=1)
    return targets, hidden[targets] + summed / count[:, None].to(hidden.dtype)


@register
@dataclass
class VisionZip(Method):
    """VisionZip: CLS-attention dominant tokens + key-similarity contextual tokens, per crop."""

    name = "visionzip"
    summary = "VisionZip: dominant tokens by CLS attention + contextual tokens merged by key similarity"
    sites = ("pre_llm",)
    dominant: int | None = None
    contextual: int | None = None

    @property
    def uses_budget(self) -> bool:
        return self.dominant is None and self.contextual is None

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        explicit = self.dominant is not None or self.contextual is not None
        if explicit and (self.dominant is None or self.contextual is None):
            raise MethodArgumentError("dominant/contextual: give both (tokens per crop), or neither and a budget")
        if explicit and (self.dominant < 0 or self.contextual < 0 or self.dominant + self.contextual < 1):
            raise MethodArgumentError(f"dominant/contextual: must be >= 0 with a positive sum; got "
                                      f"{self.dominant}, {self.contextual}")
        if not explicit:
            budget = require_budget(budget, self.name, "dominant= and contextual=")
        layers = feature_layers(anatomy)
        scored = score_layer(anatomy, max(layers))
        score = attention_score(anatomy)

        def select(ctx: Context):
            att = ctx.score(score, layer=scored, heads="sum")
            keys = ctx.get("keys", layer=scored)
            if ctx.project is not None:  # merge in the encoder's space, then the model's projector
                hidden = torch.cat([ctx.get("hidden", layer=fl) for fl in layers], -1)
            else:  # the projector merges 2x2 units (Qwen): merge the projected features
                hidden = ctx.features
            if ctx.meta["tile"].numel() and bool((ctx.meta["tile"] == -2).any()) and len(layers) > 1:
                raise SiteError("method: visionzip with a CLS feature and several feature layers is not supported")
            b_size = ctx.orig.shape[0]
            rows = []
            for b in range(b_size):
                dom, tgt, tokens = [], [], []
                for img in ctx.meta["image"][b][ctx.valid[b]].unique().tolist():
                    members = (ctx.valid[b] & (ctx.meta["image"][b] == img)).nonzero().flatten()
                    d, t, x = self.image(ctx.meta["tile"][b], att[b], keys[b], hidden[b], members, budget)
                    dom.append(d)
                    tgt.append(t)
                    tokens.append(x)
                dom_b = torch.cat(dom) if dom else torch.zeros(0, dtype=torch.long)
                tgt_b = torch.cat(tgt) if tgt else torch.zeros(0, dtype=torch.long)
                own = ctx.features[b, dom_b.to(ctx.features.device)]
                project = ctx.project if ctx.project is not None else (lambda x: x)
                made = project(torch.cat(tokens).to(ctx.features.device)) if tgt_b.numel() else own[:0]
                rows.append((torch.cat([dom_b, tgt_b]), torch.cat([own, made.to(own.dtype)])))
            return pad_rows_with_features(rows, ctx.features)

        return [Stage(self.name, "pre_llm", -1, select, capture=tuple(sorted({*layers, scored})))]

    def split(self, k: int) -> tuple[int, int]:
        """(dominant, contextual) for a crop that keeps k tokens."""
        if self.dominant is not None:
            return self.dominant, self.contextual
        n_ctx = int(round(k * CONTEXTUAL_SHARE))
        return k - n_ctx, n_ctx

    def image(
        self, tile: torch.Tensor, att: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor,
        members: torch.Tensor, budget: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image: positions of the tokens kept as they are (dominant), positions of the
        contextual targets, and the contextual tokens in the encoder's feature space."""
        cls = members[tile[members] == -2]
        crops = [members[tile[members] == t] for t in sorted(set(tile[members].tolist())) if t >= 0]
        if budget is not None:
            total = int(round(budget * members.numel()))
            if total >= members.numel():  # full budget: the model's own tokens, newlines included
                return members, members[:0], hidden[:0]
            shares = allocate(total, [c.numel() + (cls.numel() if i == 0 else 0) for i, c in enumerate(crops)])
        else:
            shares = [sum(self.split(0)) for _ in crops]
        dom, tgt, tokens = [], [], []
        for i, (crop, k) in enumerate(zip(crops, shares)):
            n_dom, n_ctx = self.split(k)
            lead = cls if i == 0 else cls[:0]  # the CLS token counts as a dominant token of the base crop
            if n_dom + n_ctx >= crop.numel() + lead.numel():  # nothing to drop
                dom.append(torch.cat([lead, crop]))
                continue
            dominant = torch.cat([lead[:n_dom], top(att, crop, max(0, n_dom - lead.numel()))])
            rest = crop[~torch.isin(crop, dominant)]
            targets, made = contextual_merge(hidden, keys, rest, n_ctx)
            dom.append(dominant)
            tgt.append(targets)
            tokens.append(made)
        empty = torch.zeros(0, dtype=torch.long)
        return (torch.cat(dom) if dom else empty, torch.cat(tgt) if tgt else empty,
                torch.cat(tokens) if tokens else hidden[:0])
