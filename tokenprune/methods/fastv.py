"""FastV — Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024.

Algorithm (paper §4, official ``fastv_forward``): after decoder layer K-1 (0-based index, paper
default K = 2), average the attention of the **last prompt token** to every image token over
heads; keep the top (1 - R) of the image tokens (paper default R = 50%) and drop the rest from
layer K on. Kept tokens keep their original positions. With a KV cache the choice is made once,
in prefill.

``budget`` b maps to R at K: the mean visual tokens per layer is (K + (L - K)(1 - R)) / L = b.
Where b is not reachable at K (b <= K / L) K moves to the latest earlier layer that reaches it.
Explicit ``k`` and ``r`` reproduce a paper setting exactly (then ``budget`` is not used).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters.base import Anatomy
from ..core.budget import earliest_layer, keep_ratio_from, require_budget
from ..core.select import topk_per_row
from ..core.stage import Context, Stage
from ..errors import MethodArgumentError
from .base import Method, register


@register
@dataclass
class FastV(Method):
    """FastV: drop low-attention image tokens after LLM layer K-1 (ECCV 2024)."""

    name = "fastv"
    summary = "FastV: last-token attention at LLM layer K-1, drop the rest from layer K (K=2)"
    sites = ("llm",)
    k: int = 2
    r: float | None = None

    @property
    def uses_budget(self) -> bool:
        return self.r is None

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        depth = anatomy.llm.num_layers
        if self.r is not None:
            if not 0.0 <= self.r < 1.0:
                raise MethodArgumentError(f"r: the dropped fraction must be in [0, 1); got {self.r!r}")
            k, keep = self.k, 1.0 - self.r
        else:
            budget = require_budget(budget, self.name, "k= and r=")
            k = earliest_layer(budget, self.k, depth)
            keep = keep_ratio_from(budget, k, depth)

        def select(ctx: Context):
            scores = ctx.score("last_token_attention", source="previous")
            return topk_per_row(scores, ctx.keep_counts(keep))

        return [Stage(self.name, "llm", k, select)]
