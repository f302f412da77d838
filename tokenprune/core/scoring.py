"""Attention scores recomputed from a layer's own projections, so they are available under any
attention backend (sdpa and flash return no weights). All functions agree with the weights of
eager attention (tests check 1e-5)."""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` (B, H, L, d) with ``cos``/``sin`` (B|1, L, d), as Llama applies it."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A projection's output (B, L, H * d) as heads (B, H, L, d) (a view)."""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


def _heads(proj: nn.Module, h: torch.Tensor, head_dim: int) -> torch.Tensor:
    return split_heads(proj(h), head_dim)


def _masked(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return logits
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask


def query_logits(
    attn: nn.Module,
    hidden: torch.Tensor,
    query_cols: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    mask: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    rotated: bool = True,
    norms: tuple[nn.Module | None, nn.Module | None] = (None, None),
    queries: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked attention logits of chosen query columns to all keys of one decoder-layer call.

    ``attn`` is the layer's attention module (``q_proj``, ``k_proj``, ``head_dim``, ``scaling``),
    ``hidden`` its normalised input (B, L, D) (only the query rows are projected),
    ``query_cols`` (B, Q) the query columns, ``position_embeddings`` the call's ``(cos, sin)`` or
    None to score without RoPE (FEATHER), ``mask`` the call's 4-D mask (bool: True attends; float:
    additive) or None (plain causal). ``keys`` (B, H_kv, L, d) are the layer's keys if already at
    hand: post-RoPE from the KV cache (``rotated=True``) or the ``k_proj`` output before RoPE
    (``rotated=False``, see :func:`split_heads`); None projects them from ``hidden``. GQA query
    heads are scored against their shared key head, as the model repeats it. ``norms`` are the
    per-head query / key norms the layer applies before RoPE (Qwen3), if any (applied here to the
    queries and to keys not taken from the cache). ``queries`` (B, Q, H * d) are the ``q_proj``
    outputs at ``query_cols`` if already at hand (the layer's own, captured in its forward); None
    projects them from ``hidden``. Returns float32 (B, H, Q, L), -inf where masked.
    """
    b, n, _ = hidden.shape
    if queries is None:
        queries = attn.q_proj(torch.gather(hidden, 1, query_cols[..., None].expand(-1, -1, hidden.shape[-1])))
    q = split_heads(queries, attn.head_dim)
    if norms[0] is not None:
        q = norms[0](q)
    if keys is None:
        keys, rotated = _heads(attn.k_proj, hidden, attn.head_dim), False
    if not rotated and norms[1] is not None:
        keys = norms[1](keys)
    if position_embeddings is not None:
        if not rotated:
            keys = apply_rope(keys, *position_embeddings)
        cos, sin = position_embeddings
        idx = query_cols[..., None].expand(-1, -1, cos.shape[-1])
        q = apply_rope(q, torch.gather(cos.expand(b, -1, -1), 1, idx), torch.gather(sin.expand(b, -1, -1), 1, idx))
    h, h_kv, nq = q.shape[1], keys.shape[1], q.shape[2]
    q = q.reshape(b, h_kv, (h // h_kv) * nq, -1)  # query heads grouped by the key head they share
    logits = (q.float() @ keys.float().transpose(-1, -2)).view(b, h, nq, -1) * float(attn.scaling)
    if mask is None:  # plain causal: the query at column c sees keys 0..c
        mask = (torch.arange(n, device=hidden.device)[None, None, :] <= query_cols[..., None])[:, None]
    else:
        rows = query_cols[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[-1])
        mask = torch.gather(mask.expand(b, -1, -1, -1), 2, rows)
    return _masked(logits, mask)


def query_attention(*args, **kwargs) -> torch.Tensor:
    """Softmax over all keys of :func:`query_logits` (same arguments): what eager attention
    returns as weights for those query rows, (B, H, Q, L)."""
    return query_logits(*args, **kwargs).softmax(-1)


def cls_attention(attn: nn.Module, hidden: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Attention of token 0 (CLS) to every token in a vision layer: (B, H, N), float32.
    ``hidden`` is the layer's normalised attention input (B, N, D)."""
    hd = hidden.shape[-1] // num_heads if not hasattr(attn, "head_dim") else attn.head_dim
    q = _heads(attn.q_proj, hidden[:, :1], hd)
    k = _heads(attn.k_proj, hidden, hd)
    return ((q.float() @ k.float().transpose(-1, -2)) * scale).softmax(-1)[:, :, 0]


def received_attention(attn: nn.Module, hidden: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Attention each token receives in a vision layer, mean over all query tokens: (B, H, N),
    float32 (a CLS-free saliency score). ``hidden`` is the layer's normalised attention input."""
    hd = hidden.shape[-1] // num_heads if not hasattr(attn, "head_dim") else attn.head_dim
    q = _heads(attn.q_proj, hidden, hd)
    k = _heads(attn.k_proj, hidden, hd)
    return ((q.float() @ k.float().transpose(-1, -2)) * scale).softmax(-1).mean(2)


def segment_received_attention(q: torch.Tensor, k: torch.Tensor, cu_seqlens: list[int], scale: float) -> torch.Tensor:
    """:func:`received_attention` in a packed sequence: queries and keys (H, N, d) of several
    attention segments (``cu_seqlens``: their boundaries, as a packed tower's blocks attend within
    images or windows); each token's attention received from the queries of its segment, mean over
    them: (H, N), float32."""
    out = torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)
    for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        logits = q[:, s:e].float() @ k[:, s:e].float().transpose(-1, -2)
        out[:, s:e] = (logits * scale).softmax(-1).mean(1)
    return out


def mean_keys(attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Keys averaged over heads (B, N, d): ToMe's and VisionZip's similarity metric."""
    return _heads(attn.k_proj, hidden, attn.head_dim).mean(1)


def key_similarity(attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the head-averaged keys of all token pairs (B, N, N)."""
    k = mean_keys(attn, hidden)
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return k @ k.transpose(-1, -2)
