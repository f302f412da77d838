"""ToMe — Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023, §3.

Algorithm (paper §3 "Token Merging", official ``tome/merge.py`` and ``tome/patch/timm.py``): in
each transformer block, the tokens are split alternately into sets A and B; every A token is linked
to its most similar B token by cosine similarity of the block's attention **keys averaged over
heads**; the ``r`` strongest links are merged (bipartite soft matching). The class token is
protected. Merged tokens are **size-weighted averages** and remember how many patches they hold;
every later attention adds ``log(size)`` to its logits (**proportional attention**). ``r`` tokens
leave per block, so the encoder ends with ``N - r * layers`` tokens.

Placement. The official code merges inside block i, between attention and MLP, with block i's
keys. Here block i's merge happens at the input of block i + 1 (the engine's vision site), still
with block i's keys (``keys(source="previous")``), i.e. after block i's MLP: block i's MLP runs on
the ``r`` tokens that are about to be merged — ``r * 2 * d * m`` extra MACs per merging block
(d hidden, m MLP width) — and the merged value is the average of the MLP outputs rather than the
MLP of the average. ``placement="mid"`` gives ToMe's own placement through an engine extension
(hooks on the layer's MLP norm and MLP): the merge is linear, so the MLP norm's input is merged
(``M h``), the MLP runs on the merged tokens, its output is copied back to every member (``U z``)
and the layer's output is merged at the next layer's input: ``M(h + U z) = M h + z`` (``M U = I``
for a size-weighted average) — exactly ToMe's block output, with the MLP on the merged tokens.
Tokens stay in their original order (a merged
token takes its B token's place) instead of ToMe's ``[unmerged A, B]`` order; attention is
permutation-equivariant, so outputs are the same.

Schedule. Merges happen before encoder layers 1..L-1 of a standalone encoder (a merge after the
last block cannot change its CLS output), and before layers 1..f in a VLM's tower, where f is the
layer whose output LLaVA reads (merges after it never reach the LLM). ``r`` (int: constant; list:
per merging layer) is ToMe's own schedule. Without ``r``, ``budget`` sets it: in a VLM, the share
of visual tokens that reach the LLM; on a standalone encoder, the mean over encoder layers of the
visual tokens entering a layer — a near-constant ``r`` (some layers ``r + 1``) reaching it. Each
bipartite matching can at most halve the tokens, which bounds the reachable budget (a 3-layer
tower merging once keeps at least half). ``rounds > 1`` (an extension, not in the paper) repeats the
matching on the survivors within one merge, using the size-weighted average of the merged keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import Anatomy
from ..core.budget import require_budget
from ..core.merge import bipartite_soft_matching, weighted_average
from ..core.stage import Context, Reduction, Stage
from ..errors import BudgetError, MethodArgumentError
from ._tower import feature_layers
from .base import Method, option, register


def merge_cap(tokens: int, rounds: int) -> int:
    """Most tokens one merge of ``rounds`` bipartite matchings can remove from ``tokens``."""
    left = tokens
    for _ in range(rounds):
        left -= left // 2
    return tokens - left


def tokens_after(n: int, schedule: list[int], rounds: int) -> list[int]:
    """Tokens left after each merge of ``schedule`` (each clipped to what a merge can remove)."""
    out, t = [], n
    for r in schedule:
        t -= min(r, merge_cap(t, rounds))
        out.append(t)
    return out


def schedule_for_total(n: int, layers: int, removed: int, rounds: int) -> list[int]:
    """Merges per layer removing ``removed`` of ``n`` tokens over ``layers`` merges, as even as the
    per-merge cap allows (earlier layers first take the remainder)."""
    out, t, left = [], n, removed
    for i in range(layers):
        r = min(-(-left // (layers - i)), merge_cap(t, rounds))
        out.append(r)
        t, left = t - r, left - r
    return out


def schedule_for_mean(n: int, depth: int, target: float, rounds: int) -> list[int]:
    """Merges before layers 1..depth-1 such that the mean over ``depth`` layers of the tokens entering
    a layer is as close as possible to ``target`` tokens: constant r, then r + 1 on the first j layers."""
    def mean(schedule: list[int]) -> float:
        return (n + sum(tokens_after(n, schedule, rounds))) / depth

    m = depth - 1
    lo = 0
    while lo < n and mean([lo + 1] * m) >= target:
        lo += 1
    best = [lo] * m
    for j in range(1, m + 1):
        cand = [lo + 1] * j + [lo] * (m - j)
        if abs(mean(cand) - target) < abs(mean(best) - target):
            best = cand
    return best


@register
@dataclass
class ToMe(Method):
    """ToMe: bipartite soft matching on head-averaged keys, size-weighted merging, proportional attention."""

    name = "tome"
    summary = "ToMe: merge r similar tokens per encoder layer (bipartite matching on keys, proportional attention)"
    sites = ("vision",)
    r: int | list[int] | None = None
    rounds: int = 1
    placement: str = "input"

    @property
    def uses_budget(self) -> bool:
        return self.r is None

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        vp = anatomy.vision
        option("placement", self.placement, ("input", "mid"))
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise MethodArgumentError(f"rounds: must be an int >= 1; got {self.rounds!r}")
        last = min(feature_layers(anatomy)) if anatomy.is_vlm else vp.num_layers - 1
        if last < 1:
            raise BudgetError(f"budget: {self.name} has no encoder layer to merge before (feature layer {last})")
        n = vp.grid[0] * vp.grid[1]
        schedule = self.schedule(anatomy, budget, n, last)
        offset = int(vp.has_cls)  # ToMe splits the whole sequence; the class token (protected) is position 0
        stages = [
            Stage(f"{self.name}{layer}", "vision", layer, self.merger(r, offset), placement=self.placement)
            for layer, r in zip(range(1, last + 1), schedule)
            if r > 0
        ]
        return stages or [Stage(self.name, "vision", 1, self.merger(0, offset))]  # r = 0: identity

    def schedule(self, anatomy: Anatomy, budget: float | None, n: int, last: int) -> list[int]:
        """r for the merges before layers 1..last."""
        if self.r is not None:
            sched = [self.r] * last if isinstance(self.r, int) else list(self.r)
            if len(sched) != last or any(not isinstance(v, int) or v < 0 for v in sched):
                raise MethodArgumentError(
                    f"r: an int >= 0 or a list of {last} ints >= 0 (merges before encoder layers 1..{last}); "
                    f"got {self.r!r}"
                )
            return sched
        budget = require_budget(budget, self.name, "r=")
        if anatomy.is_vlm:
            keep = int(round(budget * n))
            sched = schedule_for_total(n, last, n - keep, self.rounds)
            reached = (tokens_after(n, sched, self.rounds) or [n])[-1]
            if reached > keep + max(1, 0.02 * keep):
                raise BudgetError(
                    f"budget: {budget} is not reachable by {self.name} merging before tower layers 1..{last} "
                    f"(at most {n - reached} of {n} tokens merged, budget >= {reached / n:.3f}); "
                    f"raise the budget or set rounds > 1",
                    minimum=reached / n,
                )
            return sched
        depth = anatomy.vision.num_layers
        sched = schedule_for_mean(n, depth, budget * n, self.rounds)
        reached = (n + sum(tokens_after(n, sched, self.rounds))) / depth
        if reached > budget * n * 1.02:
            raise BudgetError(
                f"budget: {budget} is not reachable by {self.name} on a {depth}-layer encoder (minimum about "
                f"{reached / n:.3f}); raise the budget or set rounds > 1",
                minimum=reached / n,
            )
        return sched

    def merger(self, r: int, offset: int):
        """The select function of one merging layer."""
        rounds = self.rounds

        def select(ctx: Context) -> torch.Tensor | Reduction:
            n = ctx.orig.shape[1]
            if r == 0:
                return torch.arange(n, device=ctx.features.device).expand(ctx.orig.shape[0], n)
            x, size, orig = ctx.features, ctx.size, ctx.orig
            metric = ctx.get("keys", source="previous")
            assign = torch.arange(n, device=x.device).expand(x.shape[0], n)
            left = min(r, merge_cap(n, rounds))
            while left > 0:
                m = bipartite_soft_matching(metric, min(left, x.shape[1] // 2), offset)
                k = m.keep.shape[1]
                if k == x.shape[1]:
                    break
                metric = weighted_average(metric, size, m.assign, k)[0]
                x, size = weighted_average(x, size, m.assign, k)
                orig = torch.gather(orig, 1, m.keep.to(orig.device))
                assign = torch.gather(m.assign, 1, assign)
                left -= m.src.shape[1]
            return Reduction(x, orig, size, assign)

        return select
