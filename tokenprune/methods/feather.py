"""FEATHER — Endo, Wang, Yeung-Levy, "Feather the Throttle: Revisiting Visual Token Pruning for
Vision-Language Model Acceleration", ICCV 2025 (arXiv 2412.13180).

The paper's finding: FastV's criterion, the last prompt token's attention with RoPE, favours the
image tokens nearest the end of the sequence (RoPE's long-term decay), i.e. the bottom rows of the
image, so early pruning discards most of the top of the image and localization collapses while
most benchmarks barely move. FEATHER ("Fast and Effective Acceleration wiTH Ensemble cRiteria"):

1. criterion without RoPE: the last token's query against the image tokens' keys, both from the
   projections of layer K-1 on that layer's input with no rotary embedding, softmax over the image
   keys only, mean over heads (RoPE still applies in the model's own attention);
2. stage 1, before decoder layer 8 of 32: keep the top 30% of the image tokens by that criterion,
   united with a uniform grid sample (every 3rd row and column of the patch grid, from the first);
3. stage 2, before layer 16: keep the top 9% (0.3²) of the tokens that survived stage 1 by the same
   criterion; the uniform tokens are not protected there;
4. every kept token keeps its original position id; prefill only.

The percentages' bases were checked against the official code (``FastVLlamaModel`` in
``prismatic-vlms/prismatic/models/backbones/llm/llama2_models.py``, ``eval_feather.sh``: ``fastv_k
= [8, 16]``, ``fastv_ratio = 0.7``, ``no_rope_s=3``): stage 1 keeps ``int(0.3 N)`` of the N
original image tokens plus the grid; stage 2 keeps ``int(0.09 M)`` of the M survivors (the code
re-bases the image indices on the survivors before counting), e.g. about 19 of ~215 on LLaVA-1.5.
Layers scale with depth (1/4 and 1/2). On LLaVA-NeXT the grid is taken per partition, i.e. for
the base image and for each anyres tile, on the rows and columns each tile keeps after unpadding;
newline tokens are never on the grid but are ranked like any other token.

Explicit ``keep`` (and optionally ``layers``, ``stride``) reproduces the paper: ``keep=0.3`` is the
setting above, counts truncated as in the official code, the stage-1 count varying with how many
grid tokens the top 30% already contains. Its budget on LLaVA-1.5 is about 0.36.

Budget. ``budget`` b (mean over decoder layers of the visual tokens entering a layer, over the
unpruned count) scales both stages' ratios: with r in place of 0.3, stage 1 keeps the grid plus the
best-scored other tokens up to ``round(s1 N)``, ``s1 = r + (1 - r) g`` (the expected size of the
paper's union when attention is independent of the grid; g is the grid's share of a full patch
grid, 1/9 for 24x24), and stage 2 keeps ``round(r² M)``; r is solved so that the mean equals b.
This is the paper's union (the grid plus the best of the rest) with its count fixed, so the realised
budget does not depend on how much the two overlap. The paper's layers stay while stage 1 keeps at
least a quarter of the tokens (b >= 0.316 on 32 layers and 576 tokens; b = 0.35 gives r = 0.27);
below that no ratio at layers 8/16 is sensible (they cannot go under 0.278 at all), so both stages
move earlier together, K2 = 2 K1, to the latest pair that reaches b with that quarter (b = 0.2:
layers 5 and 10, r = 0.16; b = 0.1: layers 2 and 4, r = 0.24). PyramidDrop uses the same quarter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters.base import Anatomy
from ..core.budget import require_budget
from ..core.select import pad_rows, stride_grid, topk_per_row
from ..core.stage import Context, Stage
from ..errors import BudgetError, MethodArgumentError
from .base import Method, register

MIN_FIRST_KEEP = 0.25  # budget mode: below this stage-1 share, the stages move earlier instead


def grid_share(anatomy: Anatomy, stride: int) -> float:
    """Share of a full patch grid on the uniform ``stride`` grid (64 / 576 for 24x24, stride 3);
    1 / stride² on towers without a fixed grid (Qwen: every image has its own)."""
    rows, cols = anatomy.vision.grid
    if rows * cols == 0:
        return 1.0 / stride**2
    return math.ceil(rows / stride) * math.ceil(cols / stride) / (rows * cols)


def mean_kept(k1: int, k2: int, r: float, g: float, depth: int) -> float:
    """Mean over the layers of the kept fraction of image tokens in budget mode (see docstring)."""
    s1 = r + (1.0 - r) * g
    return (k1 + (k2 - k1) * s1 + (depth - k2) * s1 * r * r) / depth


def solve_keep(budget: float, k1: int, k2: int, g: float, depth: int) -> float:
    """r in [0, 1] with ``mean_kept(k1, k2, r) == budget`` (bisection; the mean grows with r)."""
    if budget >= 1.0:
        return 1.0
    if budget <= mean_kept(k1, k2, 0.0, g, depth):
        raise BudgetError(
            f"budget: {budget} is not reachable by FEATHER with stages before layers {k1} and {k2} of {depth} "
            f"(the uniform grid alone gives {mean_kept(k1, k2, 0.0, g, depth):.3f})",
            minimum=mean_kept(k1, k2, 0.0, g, depth),
        )
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_kept(k1, k2, mid, g, depth) < budget else (lo, mid)
    return (lo + hi) / 2


def paper_layers(depth: int) -> tuple[int, int]:
    """Layers 8 and 16 of 32, scaled to ``depth``."""
    if depth < 3:
        raise MethodArgumentError(f"layers: FEATHER needs a decoder of at least 3 layers; this one has {depth}")
    k1 = max(1, round(depth / 4))
    return k1, min(depth - 1, max(k1 + 1, round(depth / 2)))


@register
@dataclass
class Feather(Method):
    """FEATHER: no-RoPE last-token attention united with a uniform grid, then a second, deeper
    attention-only stage (ICCV 2025)."""

    name = "feather"
    summary = "FEATHER: no-RoPE last-token attention + uniform grid at L/4, attention only at L/2"
    sites = ("llm",)
    keep: float | None = None
    layers: tuple[int, int] | None = None
    stride: int = 3
    positions: str = "keep"

    @property
    def uses_budget(self) -> bool:
        return self.keep is None

    def plan(self, anatomy: Anatomy, budget: float | None) -> tuple[int, int, float]:
        """Stage layers (K1, K2) and the keep ratio r this instance uses on ``anatomy``."""
        depth = anatomy.llm.num_layers
        if self.positions not in ("keep", "renumber"):
            raise MethodArgumentError(f"positions: expected 'keep' or 'renumber', got {self.positions!r}")
        if not isinstance(self.stride, int) or self.stride < 1:
            raise MethodArgumentError(f"stride: must be a positive integer; got {self.stride!r}")
        if self.layers is not None:
            k1, k2 = (int(k) for k in self.layers)
            if not 1 <= k1 < k2 < depth:
                raise MethodArgumentError(f"layers: need 1 <= K1 < K2 < {depth}; got {self.layers!r}")
        else:
            k1, k2 = paper_layers(depth)
        if self.keep is not None:
            if not 0.0 <= self.keep <= 1.0:
                raise MethodArgumentError(f"keep: must be in [0, 1]; got {self.keep!r}")
            return k1, k2, float(self.keep)
        budget = require_budget(budget, self.name, "keep=")
        g = grid_share(anatomy, self.stride)
        if self.layers is None:  # move both stages earlier rather than keep under a quarter at stage 1
            r_min = max(0.0, (MIN_FIRST_KEEP - g) / (1.0 - g))
            while k1 > 1 and mean_kept(k1, k2, r_min, g, depth) > budget:
                k1, k2 = k1 - 1, 2 * (k1 - 1)
        return k1, k2, solve_keep(budget, k1, k2, g, depth)

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        k1, k2, r = self.plan(anatomy, budget)
        paper = self.keep is not None
        g = grid_share(anatomy, self.stride)

        def criterion(ctx: Context) -> torch.Tensor:
            return ctx.score("last_token_attention", source="previous", rope=False, normalize="visual")

        def on_grid(ctx: Context) -> torch.Tensor:
            group = ctx.meta["partition"].masked_fill(ctx.meta["tile"] < 0, -1).cpu()
            row, col = ctx.meta["row"].cpu(), ctx.meta["col"].cpu()
            return torch.stack([stride_grid(row[b], col[b], group[b], self.stride) for b in range(group.shape[0])])

        def first(ctx: Context) -> torch.Tensor:
            scores, grid = criterion(ctx), on_grid(ctx).to(ctx.orig.device)
            if paper:  # top floor(r N) united with the grid
                top = topk_per_row(scores, (ctx.n.double() * r).floor().long())
                chosen = grid.clone()
                for b, row in enumerate(top):
                    chosen[b, row[row >= 0]] = True
                return pad_rows([(c & ctx.valid[b]).nonzero().flatten() for b, c in enumerate(chosen)], ctx.orig.device)
            # the grid first, then the best of the rest, up to round(s1 N)
            return topk_per_row(scores + 2.0 * grid, ctx.keep_counts(r + (1.0 - r) * g))

        def second(ctx: Context) -> torch.Tensor:
            count = (ctx.n.double() * (r * r)).floor().long() if paper else ctx.keep_counts(r * r)
            return topk_per_row(criterion(ctx), count)

        return [
            Stage(f"{self.name}1", "llm", k1, first, self.positions),
            Stage(f"{self.name}2", "llm", k2, second, self.positions),
        ]
