"""DivPrune — Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025 (arXiv 2503.02175), §3.

Algorithm (paper §3.2, a max-min diversity problem solved greedily), per image, on the projected
visual tokens as they enter the LLM:

1. Distances ``d(i, j) = 1 - cos(x_i, x_j)`` between all of the image's tokens (features divided
   by their norm, no epsilon, in the features' own dtype).
2. The first token is the one whose nearest other token is farthest (the second-smallest distance
   of its column: the smallest is its distance to itself).
3. Then, until ``k`` tokens are chosen, the token whose minimum distance to the chosen ones is the
   largest (the first one on ties).
4. The kept tokens go to the LLM in their original order.

``budget`` b keeps ``k = round(b * n)`` of an image's ``n`` visual tokens (Python's rounding, as
the official ``int(round(SUBSET_RATIO * N))``; the paper's 0.098 keeps 56 of 576). On LLaVA-NeXT
the image's tokens are every crop's tokens and the newline tokens, all in one pool, as they enter
the LLM; several images of a sample are pruned independently, at the same ratio.

Deviations: chosen tokens are excluded from later picks, so ``k`` distinct tokens are kept (the
official loop does not exclude them and repeats an index, keeping fewer, when ``k`` exceeds the
number of distinct tokens — e.g. LLaVA-NeXT's identical newline tokens at high ratios); every
image of every sample is pruned (the official code prunes the first image of batch row 0, at a
hard-coded offset). Kept tokens keep their original position ids (the engine's convention before
the LLM; the official code rebuilds the sequence with contiguous positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import Anatomy
from ..core.budget import require_budget
from ..core.select import pad_rows
from ..core.stage import Context, Stage
from ._images import images
from .base import Method, register


def max_min_diverse(x: torch.Tensor, n: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
    """DivPrune's greedy max-min selection on several groups at once.

    ``x`` (G, N, D) holds each group's tokens (rows past ``n[g]`` are padding), ``k`` (G,) how many
    to keep. Returns, per group, the chosen positions in the order they were picked."""
    g_size, width = x.shape[:2]
    valid = torch.arange(width, device=x.device)[None] < n[:, None].to(x.device)
    xn = x / x.norm(dim=-1, keepdim=True)
    xn = torch.where(valid[..., None], xn, torch.zeros((), dtype=xn.dtype, device=xn.device))
    dist = 1 - xn @ xn.transpose(-1, -2)  # (G, N, N)
    pair = valid[:, :, None] & valid[:, None, :]
    nearest = dist.masked_fill(~pair, float("inf")).sort(dim=1).values
    second = nearest[:, 1] if width > 1 else torch.full_like(nearest[:, 0], float("inf"))
    chosen = torch.zeros(g_size, width, dtype=torch.bool, device=x.device)
    picks = [[] for _ in range(g_size)]
    rows = torch.arange(g_size, device=x.device)
    score = second.masked_fill(~valid, float("-inf"))
    min_dist = None
    for t in range(int(k.max()) if g_size else 0):
        j = score.argmax(-1)  # first maximum
        active = (t < k).to(x.device)
        for g in active.nonzero().flatten().tolist():
            picks[g].append(int(j[g]))
        chosen[rows[active], j[active]] = True
        row = dist[rows, j]
        min_dist = row if min_dist is None else torch.minimum(min_dist, row)
        score = min_dist.masked_fill(~valid | chosen, float("-inf"))
    return [torch.tensor(p, dtype=torch.long) for p in picks]


@register
@dataclass
class DivPrune(Method):
    """DivPrune: greedy max-min cosine diversity over each image's projected visual tokens."""

    name = "divprune"
    summary = "DivPrune: keep the most diverse visual tokens (greedy max-min cosine distance) before the LLM"
    sites = ("pre_llm",)

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        budget = require_budget(budget, self.name, "budget=")

        def select(ctx: Context) -> torch.Tensor:
            groups = [(b, m) for b in range(ctx.orig.shape[0]) for m in images(ctx, b)]
            if not groups:
                return pad_rows([torch.zeros(0, dtype=torch.long)] * ctx.orig.shape[0])
            n = torch.tensor([int(m.numel()) for _, m in groups])
            k = torch.round(n.double() * budget).long().clamp(min=1).minimum(n)
            x = ctx.features.new_zeros(len(groups), int(n.max()), ctx.features.shape[-1])
            for g, (b, m) in enumerate(groups):
                x[g, : m.numel()] = ctx.features[b, m.to(ctx.features.device)]
            picks = max_min_diverse(x, n, k)
            rows = [[] for _ in range(ctx.orig.shape[0])]
            for (b, m), p in zip(groups, picks):
                rows[b].append(m[p])
            return pad_rows([torch.cat(r) if r else torch.zeros(0, dtype=torch.long) for r in rows])

        return [Stage(self.name, "pre_llm", -1, select)]
