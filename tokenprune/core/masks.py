"""Index maps and attention masks after tokens leave a sequence.

A column map ``cols`` (B, L') lists, for each new column, the column of the old sequence it
comes from, ascending per row; rows that keep fewer tokens are left-filled with -1 ("fillers"),
so the last column stays the last prompt token. Fillers are masked as keys and attend only to
themselves (a fully masked row would make sdpa return NaN).
"""

from __future__ import annotations

import torch


def columns_from_keep(keep: torch.Tensor) -> torch.Tensor:
    """(B, L) bool keep-mask -> (B, max kept) column map, left-filled with -1."""
    lens = keep.sum(-1)
    width = int(lens.max()) if keep.numel() else 0
    pos = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    # kept columns sort to the end, in order; dropped ones to the front
    key = torch.where(keep, pos + keep.shape[1], pos)
    order = key.argsort(dim=-1, stable=True)[:, keep.shape[1] - width :]
    slot = torch.arange(width, device=keep.device)[None]
    return torch.where(slot >= width - lens[:, None], order, torch.full_like(order, -1))


def gather_cols(x: torch.Tensor, cols: torch.Tensor, dim: int = 1, fill=None) -> torch.Tensor:
    """``x`` indexed by ``cols`` along ``dim`` (batch dim 0 broadcast); fillers get ``fill`` (or
    column 0's value)."""
    b = cols.shape[0]
    x = x.expand(b, *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = b, cols.shape[1]
    idx = cols.clamp(min=0).view(shape).expand(*[s if i != dim else cols.shape[1] for i, s in enumerate(x.shape)])
    out = torch.gather(x, dim, idx)
    if fill is not None:
        out = out.masked_fill((cols < 0).view(shape), fill)
    return out


def gather_last(x: torch.Tensor, cols: torch.Tensor, fill=None) -> torch.Tensor:
    """Position ids ``x`` indexed by ``cols`` along their last dim, whatever their rank: (B|1, L)
    (1-D positions) or (R, B|1, L) (M-RoPE's 3 or 4 rows)."""
    if x.dim() == 2:
        return gather_cols(x, cols, fill=fill)
    return torch.stack([gather_cols(row, cols, fill=fill) for row in x])


def compose(outer: torch.Tensor | None, inner: torch.Tensor) -> torch.Tensor:
    """Column map of applying ``inner`` after ``outer`` (both -1 filled)."""
    if outer is None:
        return inner
    out = torch.gather(outer, 1, inner.clamp(min=0))
    return torch.where(inner < 0, torch.full_like(out, -1), out)


def _allowed_value(mask: torch.Tensor):
    return True if mask.dtype == torch.bool else 0.0


def _blocked_value(mask: torch.Tensor):
    return False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min


def causal_bool(q_len: int, kv_len: int, device) -> torch.Tensor:
    """(1, 1, q, kv) bool causal mask with the queries at the end of the keys."""
    q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return (torch.arange(kv_len, device=device)[None] <= q)[None, None]


def prefill_mask(mask: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor | None:
    """The 4-D mask of a prefill after keeping columns ``cols`` (rows and keys both)."""
    fill = cols < 0
    if mask is None:
        if not bool(fill.any()):
            return None  # q == kv and nothing to hide: sdpa's is_causal stays right
        n = int(cols.clamp(min=0).max()) + 1
        mask = causal_bool(n, n, cols.device)
    m = gather_cols(mask, cols, dim=2)
    m = gather_cols(m, cols, dim=3)
    if bool(fill.any()):
        m = m.masked_fill(fill[:, None, None, :], _blocked_value(m))
        eye = torch.eye(cols.shape[1], dtype=torch.bool, device=cols.device)[None, None]
        m = m.masked_fill(eye & fill[:, None, :, None], _allowed_value(m))
    return m


def decode_mask(mask: torch.Tensor | None, cols: torch.Tensor, prompt_len: int, q_len: int, kv_len: int):
    """The mask of a decode step for a layer whose cache holds the kept prompt columns ``cols``
    (of ``prompt_len``) followed by every generated token; ``kv_len`` is the unpruned key length."""
    fill = cols < 0
    if mask is None:
        if not bool(fill.any()):
            return None
        mask = causal_bool(q_len, kv_len, cols.device).expand(cols.shape[0], -1, -1, -1)
    tail = torch.arange(prompt_len, mask.shape[-1], device=cols.device).expand(cols.shape[0], -1)
    m = gather_cols(mask, torch.cat([cols, tail], dim=1), dim=3)
    if bool(fill.any()):
        pad = torch.zeros_like(tail, dtype=torch.bool)
        m = m.masked_fill(torch.cat([fill, pad], 1)[:, None, None, :], _blocked_value(m))
    return m
