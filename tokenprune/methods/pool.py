"""Pool — the downsampling control: average-pool each image's visual-token grid to the budget.

VTC-Bench (Liao et al., 2025) found that plainly downsampling the image beats many token-compression
methods, and UniPruneBench ships a ``Pool`` baseline; this is that control on the engine: no scores,
only geometry.

Per image, ``total = round(b * n)`` of its ``n`` visual tokens are kept (newline tokens count in
``n`` and are dropped, as VisionZip and HiRED here do), split over its crops (LLaVA-1.5: the one
patch grid; LLaVA-NeXT: the base view and every anyres tile after unpadding) in proportion to their
sizes. A crop of ``r x c`` patches that keeps ``k`` tokens is cut into ``a = round(sqrt(k r / c))``
bands of rows (at least ``ceil(k / c)``, at most ``r`` and ``k``) and band ``i`` into ``k_i`` windows of
columns (``k`` spread evenly over the bands, earlier bands taking the remainder), with boundaries
``floor(i * size / parts)``: disjoint windows covering the crop, so every patch is averaged exactly
once and exactly ``k`` tokens come out (``adaptive_avg_pool2d`` when ``k`` is a product ``a x b``,
except that its windows may overlap). Each pooled token is the plain mean of its window's projected
features (what the LLM would have received), computed in the features' dtype.

Position: a pooled token takes the slot, and so the position id, of its window's centre patch (row
``(r0 + r1 - 1) // 2``, column likewise: the top-left of the centre 2 x 2 for even sizes); the trace
records those centre patches as the kept tokens (``info["position"] == "window centre"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters.base import Anatomy
from ..core.budget import require_budget
from ..core.select import allocate, pad_rows_with_features
from ..core.stage import Context, Stage
from ._images import crops, images
from .base import Method, register


def windows(rows: int, cols: int, k: int) -> list[tuple[int, int, int, int]]:
    """``k`` disjoint windows ``(r0, r1, c0, c1)`` covering an ``rows x cols`` grid, in raster order."""
    a = min(rows, k, max(math.ceil(k / cols), round(math.sqrt(k * rows / cols))))
    out = []
    for i, per_band in enumerate(allocate(k, [cols] * a)):
        r0, r1 = i * rows // a, (i + 1) * rows // a
        out += [(r0, r1, j * cols // per_band, (j + 1) * cols // per_band) for j in range(per_band)]
    return out


def pool_crop(feats: torch.Tensor, row: torch.Tensor, col: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool one crop's tokens (features (n, D), patch coordinates ``row``/``col``) to ``k``:
    returns each window's centre token (position into the crop's tokens) and its mean feature."""
    r_lo, c_lo = int(row.min()), int(col.min())
    rows, cols = int(row.max()) - r_lo + 1, int(col.max()) - c_lo + 1
    if rows * cols != row.numel():
        raise ValueError(f"crop: tokens do not fill a {rows}x{cols} rectangle")
    slot = torch.full((rows, cols), -1, dtype=torch.long)
    slot[row - r_lo, col - c_lo] = torch.arange(row.numel())
    centres, means = [], []
    for r0, r1, c0, c1 in windows(rows, cols, k):
        members = slot[r0:r1, c0:c1].flatten().to(feats.device)
        centres.append(int(slot[(r0 + r1 - 1) // 2, (c0 + c1 - 1) // 2]))
        means.append(feats[members].mean(0))
    return torch.tensor(centres, dtype=torch.long), torch.stack(means)


@register
@dataclass
class Pool(Method):
    """Pool: average-pool every crop's patch grid to the budget (downsampling control)."""

    name = "pool"
    summary = "average-pool each image's / tile's visual-token grid to the budget; downsampling baseline"
    sites = ("pre_llm",)

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        budget = require_budget(budget, self.name, "budget=")

        def select(ctx: Context):
            b_size, dim = ctx.orig.shape[0], ctx.features.shape[-1]
            rows = []
            for b in range(b_size):
                pos, feats = [], []
                for members in images(ctx, b):
                    total = int(round(budget * members.numel()))
                    if total >= members.numel():  # full budget: the model's own tokens
                        pos.append(members)
                        feats.append(ctx.features[b, members.to(ctx.features.device)])
                        continue
                    for crop, k in crops(ctx, b, members, max(1, total)):
                        if k == 0:
                            continue
                        c, f = pool_crop(ctx.features[b, crop.to(ctx.features.device)],
                                         ctx.meta["row"][b, crop].cpu(), ctx.meta["col"][b, crop].cpu(), k)
                        pos.append(crop[c])
                        feats.append(f)
                rows.append((torch.cat(pos) if pos else torch.zeros(0, dtype=torch.long),
                             torch.cat(feats) if feats else ctx.features.new_zeros(0, dim)))
            return pad_rows_with_features(rows, ctx.features)

        return [Stage(self.name, "pre_llm", -1, select, info={"position": "window centre"})]
