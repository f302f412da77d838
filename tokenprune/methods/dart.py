"""DART — Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", EMNLP 2025 (arXiv 2502.11494), §3.

Algorithm (paper §3.2 "pivot tokens" and §3.3 "duplication-aware selection"; official
``get_retained_image_token`` in ZichenWen1/DART's ``modeling_llama_self.py``), in prefill, before
LLM decoder layer K (official K = 2), per sample:

1. *Pivots*: the ``pivot_image`` (4) image tokens with the largest L1 norm of their layer-(K-1)
   keys (after RoPE, all key heads concatenated), plus the ``pivot_text`` (4) tokens after the
   image (the question and the template's tail, e.g. ``ASSISTANT:``) with the largest key L1 norm.
2. *Duplication-aware selection*: the hidden states are layer K-1's output passed through the
   model's **final** norm. Pivot by pivot, in the order of the official loop (Python ``set``
   order of the pivots' absolute positions; the order changes the result), each pivot claims the
   still-unclaimed image tokens least cosine-similar to it (``torch.nn.functional.cosine_similarity``)
   and removes them from the pool. The image pivots and the claimed tokens are kept; the text
   pivots are text and stay anyway. Kept image tokens keep their original positions.

Counts (the official convention): each of the ``pivot_image + pivot_text`` pivots claims
``max_num_trunction // (pivot_image + pivot_text)`` tokens, so the paper's "128 tokens" keeps
4 + 8 x 16 = 132 image tokens (64 -> 68, 32 -> 36); on LLaVA-NeXT the count is
``min(max_num_trunction, N - pivot_image) // 8`` (the official ``retain_token_num_for_llava_next``
320 keeps 324 whatever the reduction ratio). ``max_num_trunction=`` reproduces these exactly
(``budget`` is then not used).

``budget`` b maps exactly, as for FastV: K is ``k`` (or the latest earlier layer that can reach
b), the image tokens kept from layer K on are ``T = round(R * N)`` with ``(K + (L - K) R) / L = b``,
and they are made of ``min(pivot_image, T)`` image pivots plus ``T - min(pivot_image, T)`` claimed
tokens spread over the pivots: each claims ``C // P`` and the first ``C % P`` pivots in processing
order one more (the official integer division would keep up to P - 1 fewer).

Several images of a sample form one pool of image tokens (LLaVA-NeXT's crops and newline tokens do
in the official code too); the text pivots are chosen among the tokens after the last image.
Deviations: batches of any size with padding (the official code reads row 0, a hard-coded image
start 35 and length 576, and slices the causal mask as if there were no padding); absolute
positions are counted among each sample's real tokens, so padding does not change the order;
ties in the claims go to the earlier token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..adapters.base import Anatomy
from ..core.budget import earliest_layer, keep_ratio_from, require_budget
from ..core.select import keep_counts, pad_rows
from ..core.stage import Context, Stage
from ..errors import MethodArgumentError, SiteError
from .base import Method, register


def pivot_order(image: list[int], text: list[int]) -> list[int]:
    """The official loop's processing order of the pivots (absolute positions): Python set order."""
    return list(set(image + text).copy())


def claim(hidden: torch.Tensor, pivots: list[int], counts: list[int], pool: list[int]) -> list[int]:
    """Each pivot in turn claims ``counts[i]`` tokens of ``pool`` (positions into ``hidden``) least
    cosine-similar to it; returns the claimed positions."""
    pool = sorted(pool)
    claimed = []
    for p, m in zip(pivots, counts):
        if m <= 0 or not pool:
            continue
        idx = torch.tensor(pool, device=hidden.device)
        sim = -F.cosine_similarity(hidden[p][None], hidden[idx], dim=-1)
        take = sim.float().argsort(descending=True, stable=True)[:m].tolist()
        got = [pool[i] for i in take]
        claimed += got
        pool = [q for q in pool if q not in set(got)]
    return claimed


@register
@dataclass
class DART(Method):
    """DART: keep the image tokens least similar to key-norm pivots, before LLM layer K (EMNLP 2025)."""

    name = "dart"
    summary = "DART: pivots by key L1 norm at LLM layer K-1, keep the image tokens least similar to them (K=2)"
    sites = ("llm",)
    k: int = 2
    pivot_image: int = 4
    pivot_text: int = 4
    max_num_trunction: int | None = None

    @property
    def uses_budget(self) -> bool:
        return self.max_num_trunction is None

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        if self.pivot_image < 1 or self.pivot_text < 0:
            raise MethodArgumentError(f"pivot_image/pivot_text: need >= 1 and >= 0; got {self.pivot_image}, "
                                      f"{self.pivot_text}")
        if anatomy.llm.norm is None:
            raise SiteError(f"method: dart compares hidden states after the LLM's final norm; {anatomy.name} has none")
        depth = anatomy.llm.num_layers
        if self.max_num_trunction is not None:
            if self.max_num_trunction < 0:
                raise MethodArgumentError(f"max_num_trunction: must be >= 0; got {self.max_num_trunction}")
            k, keep = self.k, None
        else:
            budget = require_budget(budget, self.name, "max_num_trunction=")
            k = earliest_layer(budget, self.k, depth)
            keep = keep_ratio_from(budget, k, depth)
        info = {"k": k, "pivots": (self.pivot_image, self.pivot_text),
                "counts": "official" if keep is None else "budget"}
        return [Stage(self.name, "llm", k, lambda ctx: self.select(ctx, keep), info=info)]

    def plan(self, n: int, keep: float | None, n_text: int) -> tuple[int, list[int]]:
        """(image pivots, claims per pivot in processing order) for ``n`` image tokens."""
        n_text = min(self.pivot_text, n_text)
        if keep is None:
            n_img = min(self.pivot_image, n)
            per = min(self.max_num_trunction, n - n_img) // (self.pivot_image + self.pivot_text)
            return n_img, [per] * (n_img + n_text)
        total = int(keep_counts(torch.tensor([n]), keep)[0])
        n_img = min(self.pivot_image, total)
        claims, pivots = total - n_img, n_img + n_text
        return n_img, [claims // pivots + (1 if i < claims % pivots else 0) for i in range(pivots)]

    def select(self, ctx: Context, keep: float | None) -> torch.Tensor:
        keys, hidden = ctx.get("keys"), ctx.get("hidden", norm="final")
        cols, seq = ctx.get("columns"), ctx.get("sequence")
        rows = []
        for b in range(cols.shape[0]):
            image = cols[b][cols[b] >= 0]
            n = int(image.numel())
            if n == 0:
                rows.append(torch.zeros(0, dtype=torch.long))
                continue
            text = ((torch.arange(seq.shape[1], device=seq.device) > image.max()) & (seq[b] >= 0)).nonzero().flatten()
            n_img, claims = self.plan(n, keep, int(text.numel()))
            norms = keys[b].norm(p=1, dim=-1)
            img_piv = image[norms[image].float().argsort(descending=True, stable=True)[:n_img]]
            txt_piv = text[norms[text].float().argsort(descending=True, stable=True)[: len(claims) - n_img]]
            at = {int(seq[b, c]): int(c) for c in torch.cat([img_piv, txt_piv])}
            order = [at[s] for s in pivot_order([int(seq[b, c]) for c in img_piv], [int(seq[b, c]) for c in txt_piv])]
            pivots = set(img_piv.tolist())
            pool = [c for c in image.tolist() if c not in pivots]
            kept = pivots | set(claim(hidden[b], order, claims, pool))
            slot = {int(c): i for i, c in enumerate(cols[b].tolist()) if c >= 0}
            rows.append(torch.tensor(sorted(slot[c] for c in kept), dtype=torch.long))
        return pad_rows(rows)
