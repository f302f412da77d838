"""Selection primitives shared by all methods: per-row top-k, evenly spread grid sampling, random
subsets and budget allocation. Selections are padded LongTensors (B, K) of positions into each
row's candidate list, ascending, padded with -1 where rows keep fewer."""

from __future__ import annotations

import math

import torch


def pad_rows(rows: list[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """Stack 1-D LongTensors of different lengths into (B, max) sorted rows, padded with -1."""
    width = max((int(r.numel()) for r in rows), default=0)
    out = torch.full((len(rows), width), -1, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        if r.numel():
            out[b, : r.numel()] = r.sort().values.to(out.device)
    return out


def pad_rows_with_features(rows: list[tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (positions, features) of different lengths, each put in position order, as a selection
    (B, max) padded with -1 and features (B, max, D) padded with zeros (dtype and device of ``like``)."""
    width = max((int(p.numel()) for p, _ in rows), default=0)
    sel = torch.full((len(rows), width), -1, dtype=torch.long)
    out = like.new_zeros(len(rows), width, like.shape[-1])
    for b, (p, f) in enumerate(rows):
        order = p.argsort()
        sel[b, : p.numel()] = p[order]
        out[b, : p.numel()] = f[order.to(f.device)]
    return sel, out


def keep_counts(n: torch.Tensor, ratio: float) -> torch.Tensor:
    """Tokens each row keeps at a keep-ratio: round(n * ratio), at least 1 where n > 0."""
    k = torch.round(n.double() * ratio).long()
    return torch.where(n > 0, k.clamp(min=1), k).minimum(n)


def topk_per_row(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Top-``k[b]`` positions of each row of ``scores`` (B, N; -inf marks padding), ascending."""
    if scores.shape[1] == 0:
        return torch.full((scores.shape[0], 0), -1, dtype=torch.long, device=scores.device)
    order = scores.float().argsort(dim=-1, descending=True, stable=True)
    return pad_rows([order[b, : int(k[b])] for b in range(scores.shape[0])], scores.device)


def allocate(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` tokens over groups proportionally to ``sizes`` (largest remainder), never
    giving a group more than it has."""
    s = sum(sizes)
    if s == 0:
        return [0] * len(sizes)
    exact = [total * n / s for n in sizes]
    out = [min(int(math.floor(e)), n) for e, n in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    left = total - sum(out)
    while left > 0 and any(out[i] < sizes[i] for i in order):
        for i in order:
            if left and out[i] < sizes[i]:
                out[i] += 1
                left -= 1
    return out


def _spread(n: int, k: int) -> torch.Tensor:
    """``k`` of ``range(n)`` evenly spaced, centred (k <= n)."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).floor().long().clamp(max=n - 1)


def grid_sample(row: torch.Tensor, col: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly ``k`` positions of tokens at patch coordinates (``row``, ``col``), spread evenly
    over the grid: a lattice of about sqrt(k) rows x cols of the occupied rows and columns, then
    extras dropped (or missing ones added) evenly in raster order. Ascending positions."""
    n = int(row.numel())
    k = max(0, min(k, n))
    if k == n:
        return torch.arange(n)
    order = torch.argsort(row * (int(col.max()) + 1 if n else 1) + col)
    rows, cols = row.unique(), col.unique()
    a = max(1, min(len(rows), round(math.sqrt(k * len(rows) / max(1, len(cols))))))
    b = max(1, min(len(cols), math.ceil(k / a)))
    pick_r, pick_c = rows[_spread(len(rows), a)], cols[_spread(len(cols), b)]
    on = torch.isin(row[order], pick_r) & torch.isin(col[order], pick_c)
    chosen, rest = order[on], order[~on]
    if chosen.numel() >= k:
        chosen = chosen[_spread(chosen.numel(), k)]
    else:
        chosen = torch.cat([chosen, rest[_spread(rest.numel(), k - chosen.numel())]])
    return chosen.sort().values


def random_subset(n: int, k: int, seed: int) -> torch.Tensor:
    """``k`` of ``range(n)`` drawn with a generator seeded by ``seed`` alone, so a sample's choice
    does not depend on the rest of the batch. Ascending."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


def stride_grid(row: torch.Tensor, col: torch.Tensor, group: torch.Tensor, stride: int) -> torch.Tensor:
    """Bool mask of the tokens on every ``stride``-th row and column of their group's patch grid,
    counted from the group's first occupied row and column: ``grid[::stride, ::stride]`` of each
    full grid (a base image or an anyres tile). 1-D inputs; tokens with ``group < 0`` (padding,
    newline or CLS tokens) are never on the grid."""
    if stride < 1:
        raise ValueError(f"stride: must be >= 1, got {stride}")
    on = torch.zeros_like(row, dtype=torch.bool)
    for g in group[group >= 0].unique():
        member = group == g
        r0, c0 = row[member].min(), col[member].min()
        on |= member & ((row - r0) % stride == 0) & ((col - c0) % stride == 0)
    return on
