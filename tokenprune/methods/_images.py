"""Per-image grouping of a pre-LLM stage's candidates, shared by the methods that choose per image
(and per crop on LLaVA-NeXT) before the LLM."""

from __future__ import annotations

import torch

from ..core.select import allocate, pad_rows
from ..core.stage import Context


def images(ctx: Context, b: int) -> list[torch.Tensor]:
    """Candidate positions of each image of sample ``b``, in image order."""
    valid = ctx.valid[b]
    image = ctx.meta["image"][b]
    return [(valid & (image == i)).nonzero().flatten() for i in image[valid].unique().tolist()]


def crops(ctx: Context, b: int, members: torch.Tensor, total: int) -> list[tuple[torch.Tensor, int]]:
    """The patch crops of one image (base view, then each anyres tile; newline and CLS tokens are
    in none) with their share of ``total`` kept tokens, in proportion to their sizes."""
    tile = ctx.meta["tile"][b, members]
    parts = [members[tile == t] for t in sorted(set(tile.tolist())) if t >= 0]
    return list(zip(parts, allocate(total, [int(p.numel()) for p in parts])))


def per_image(ctx: Context, budget: float, choose) -> torch.Tensor:
    """Selection (B, K) from ``choose(b, members, total)`` -> kept positions of one image, where
    ``total = round(budget * n)`` of its ``n`` candidates; at ``total >= n`` every candidate stays."""
    rows = []
    for b in range(ctx.orig.shape[0]):
        kept = []
        for members in images(ctx, b):
            total = int(round(budget * members.numel()))
            kept.append(members if total >= members.numel() else choose(b, members, max(1, total)))
        rows.append(torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long))
    return pad_rows(rows)
