"""Merge primitives shared by merging methods: bipartite soft matching, grouped (size-weighted)
averages, nearest-centre assignment, local soft k-means on a patch grid and the reconstruction of
full-resolution tokens from clustered ones.

Merges are described by an *assignment*: ``assign`` (B, N) gives, for each input token, the output
slot (0..K-1) it goes to; the output slots are in the order of their representative tokens. All
functions are batched and work on any device; none knows about a particular method or model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Matching:
    """Result of :func:`bipartite_soft_matching` for a batch.

    ``keep`` (B, N - r) are the positions of the tokens that survive (the unmerged tokens of set A
    and every token of set B), ascending; ``assign`` (B, N) maps each input position to its output
    slot in ``keep`` order (a merged source token goes to its destination's slot); ``src`` and
    ``dst`` (B, r) are the merged positions and the positions they were merged into.
    """

    keep: torch.Tensor
    assign: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def bipartite_soft_matching(metric: torch.Tensor, r: int, offset: int = 0) -> Matching:
    """Pick ``r`` token pairs to merge by bipartite soft matching (Bolya et al., ToMe, ICLR 2023, §3).

    The N tokens of ``metric`` (B, N, d) alternate between set A and set B: token j is in A when
    ``(j + offset)`` is even (``offset=1`` reproduces the split of a sequence whose first element, a
    protected class token, is not among the N). Every A token draws an edge to its most similar B
    token (cosine similarity); the ``r`` A tokens with the strongest edges are merged into their B
    partners. ``r`` is clipped to the size of A.
    """
    b, n, _ = metric.shape
    pos = torch.arange(n, device=metric.device)
    a_pos, b_pos = pos[(pos + offset) % 2 == 0], pos[(pos + offset) % 2 == 1]
    r = max(0, min(int(r), a_pos.numel(), n // 2))
    m = _unit(metric.float())
    scores = m[:, a_pos] @ m[:, b_pos].transpose(-1, -2)  # (B, |A|, |B|)
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True, stable=True)
    src_a = order[:, :r]
    src = a_pos[src_a]
    dst = b_pos[torch.gather(partner, 1, src_a)]
    merged = torch.zeros(b, n, dtype=torch.bool, device=metric.device)
    merged.scatter_(1, src, True)
    keep = pos.expand(b, n)[~merged].view(b, n - r)
    slot = torch.full((b, n), -1, dtype=torch.long, device=metric.device)
    slot.scatter_(1, keep, torch.arange(n - r, device=metric.device).expand(b, -1))
    assign = slot.scatter(1, src, torch.gather(slot, 1, dst))
    return Matching(keep, assign, src, dst)


def group_sum(x: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the tokens ``x`` (B, N, D) that share an output slot of ``assign`` (B, N): (B, k, D).
    Tokens with ``assign < 0`` are left out."""
    out = torch.zeros(x.shape[0], k + 1, x.shape[-1], dtype=x.dtype, device=x.device)
    idx = torch.where(assign < 0, k, assign)
    out.scatter_add_(1, idx[..., None].expand(-1, -1, x.shape[-1]), x)
    return out[:, :k]


def weighted_average(
    x: torch.Tensor, size: torch.Tensor | None, assign: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the tokens in each slot (ToMe's ``merge_wavg``): returns the merged
    tokens ``sum(size * x) / sum(size)`` (B, k, D) and the merged sizes ``sum(size)`` (B, k).
    ``size`` (B, N) defaults to ones."""
    if size is None:
        size = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    size = size.to(x.dtype)
    total = group_sum(size[..., None], assign, k)
    return group_sum(x * size[..., None], assign, k) / total.clamp_min(1e-12), total[..., 0]


def nearest(metric: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar centre for every token: ``metric`` (B, N, d), ``centres``
    (B, K, d) -> (B, N)."""
    return (_unit(metric.float()) @ _unit(centres.float()).transpose(-1, -2)).argmax(-1)


def grid_init(
    x: torch.Tensor, rows: int, cols: int, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial cluster centres of tokens ``x`` (B, rows*cols, D) laid out on a raster grid: the
    ``h x w`` adaptive average pool of the token map (B, h*w, D), and each token's initial cell
    (rows*cols,): the nearest-neighbour upsampling of the cell grid to the token grid."""
    b, _, d = x.shape
    fmap = x.transpose(1, 2).reshape(b, d, rows, cols)
    centres = F.adaptive_avg_pool2d(fmap.float(), (h, w)).to(x.dtype).flatten(2).transpose(1, 2)
    cells = torch.arange(h * w, dtype=torch.float32, device=x.device).view(1, 1, h, w)
    label = F.interpolate(cells, size=(rows, cols), mode="nearest").long().flatten()
    return centres, label


def local_window(label: torch.Tensor, h: int, w: int, radius: int) -> torch.Tensor:
    """(N, h*w) bool: cell c is within ``radius`` cells (Chebyshev distance on the ``h x w`` cell
    grid) of token j's initial cell ``label[j]``."""
    cell = torch.arange(h * w, device=label.device)
    dy = (label[:, None] // w - cell[None] // w).abs()
    dx = (label[:, None] % w - cell[None] % w).abs()
    return (dy <= radius) & (dx <= radius)


def sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (B, N, K) between ``a`` (B, N, D) and ``b`` (B, K, D), >= 0."""
    a, b = a.float(), b.float()
    d = (a * a).sum(-1)[..., None] + (b * b).sum(-1)[:, None] - 2 * a @ b.transpose(-1, -2)
    return d.clamp_min(0)


def soft_kmeans(
    x: torch.Tensor, centres: torch.Tensor, allowed: torch.Tensor, iters: int, temperature: float
) -> torch.Tensor:
    """``iters`` rounds of local soft k-means: every token spreads over the centres it is
    ``allowed`` (N, K) to reach with weights ``softmax(-temperature * ||x - c||^2)``; every centre
    becomes the weighted mean of the tokens. Returns the centres (B, K, D)."""
    for _ in range(iters):
        logits = (-temperature * sq_dist(x, centres)).masked_fill(~allowed, float("-inf"))
        aff = logits.softmax(-1)  # (B, N, K): each token's distribution over centres
        centres = (aff.transpose(1, 2) @ x.float()) / aff.sum(1)[..., None].clamp_min(1e-16)
        centres = centres.to(x.dtype)
    return centres


def reconstruction_weights(before: torch.Tensor, centres: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Weights (B, N, K) that rebuild N tokens from K clustered ones: ``exp(-temperature * ||f - c||^2)``
    between each token's features before clustering ``before`` (B, N, D) and the centres (B, K, D),
    kept for the ``k`` largest per token (ties at the k-th value kept) and L2-normalised over the
    centres. Computed in log space so that far-away tokens do not underflow to all-zero weights."""
    logw = -temperature * sq_dist(before, centres)
    if 0 < k < logw.shape[-1]:
        kth = logw.topk(k, dim=-1).values[..., -1:]
        logw = logw.masked_fill(logw < kth, float("-inf"))
    return (logw - 0.5 * torch.logsumexp(2 * logw, dim=-1, keepdim=True)).exp()


def reconstruct(weights: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Full-resolution tokens (B, N, D) as ``weights`` (B, N, K) times clustered ``tokens`` (B, K, D)."""
    return (weights.to(tokens.dtype) @ tokens)
