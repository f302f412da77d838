"""PyramidDrop — Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", CVPR 2025 (arXiv 2410.17247).

Algorithm (paper §3; official ``pdrop_forward`` and ``pdrop_rank_drop`` in
``llava/model/modeling_llama_pdrop.py``): the decoder is cut into S = 4 stages of equal depth. At
the end of each stage but the last, i.e. before decoder layers 8, 16 and 24 of 32 (1/4, 1/2 and 3/4
of the depth), the image tokens that entered the stage are ranked and a ratio λ of them is kept
(paper λ = 0.5: 576 -> 288 -> 144 -> 72 tokens). The ranking, in prefill only:

1. the hidden states about to enter layer K go through layer K's own ``input_layernorm``, ``q_proj``
   and ``k_proj``, with RoPE at the current position ids;
2. the query is the last instruction token (the last prompt token); its attention row is
   ``softmax(q k^T / sqrt(d) + causal mask)`` over the whole sequence, averaged over heads;
3. the image columns of that row are ranked and the top ones kept, in their original order;
4. the shortened sequence is renumbered 0..L'-1 (``positions="renumber"``); while decoding, the new
   token's position is shifted down by the number of tokens dropped before each layer, so it stays
   contiguous with each layer's shorter cache. ``positions="keep"`` keeps the original ids instead.

Budget. ``budget`` b is the mean over decoder layers of the visual tokens entering a layer, as a
fraction of the unpruned count (the papers' "average tokens": 270 of 576 for the default above).
The stage ratios always follow the paper's 1, λ, λ², λ³; b chooses the stage boundaries and λ:

* b >= 0.332 (λ >= 1/4, i.e. the first drop keeps at least a quarter, the rule FEATHER uses too;
  b = 0.332 is 192 of 576 tokens, the highest of the comparison papers' 192/128/64 settings): the
  official boundaries at 1/4, 1/2 and 3/4 of the depth, λ solved from ``(1 + λ + λ² + λ³) / 4 = b``
  (b = 0.469 gives the paper's λ = 0.5; b = 0.35: λ = 0.29).
* below: those boundaries could only reach b by dropping nearly everything at 1/4 depth (λ -> 0 at
  b = 0.25) and cannot reach it at all below 0.25, so the boundaries move earlier as the PyramidDrop
  authors advise for the 128- and 64-token settings (Cooperx521/PyramidDrop issues #10 and #29:
  keep the λ, λ², ... structure and prune from a shallow layer, e.g. layers 2, 8, 16 of 32 with
  λ = 0.19 for 64 tokens): boundaries at 1/16, 1/4 and 1/2 of the depth, λ solved again (b = 0.222,
  128 tokens: λ = 0.42; b = 0.111, 64 tokens: λ = 0.19). Where b is at or below 1/16, the first
  boundary moves to the latest earlier layer that can still reach it.

Explicit ``lam`` and ``layers`` reproduce a paper setting exactly (``budget`` is then unused);
``lam`` alone uses the official boundaries; ``layers`` alone solves λ from ``budget``.

Counts. Each drop keeps ``round(λ n)`` of the n image tokens that entered the stage (at least one).
The official code keeps ``int(N λ^s)`` of the original N; the two agree on 576 tokens at λ = 0.5 and
differ only by rounding (a token or so per stage) elsewhere. With λ = 1 nothing is dropped and
positions are left as they are (renumbering an unpruned sequence is the identity in the official,
right-padded code).
Beyond the official code: batches with left padding (the official code handles right padding and is
evaluated at batch size 1), LLaVA-NeXT (all of a sample's anyres tokens, newline tokens included,
are ranked together, as in the official LLaVA-NeXT scripts), KV-cache generation with either
position convention.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters.base import Anatomy
from ..core.budget import earliest_layer, require_budget
from ..core.select import topk_per_row
from ..core.stage import Context, Stage
from ..errors import BudgetError, MethodArgumentError
from .base import Method, option, register

OFFICIAL = (1 / 4, 1 / 2, 3 / 4)  # layers 8, 16, 24 of 32
SHALLOW = (1 / 16, 1 / 4, 1 / 2)  # layers 2, 8, 16 of 32 (authors' advice for low budgets)
MIN_OFFICIAL_LAM = 0.25  # below this the official boundaries give way to SHALLOW


def boundaries(fractions: tuple[float, ...], depth: int) -> list[int]:
    """Stage boundaries at ``fractions`` of a ``depth``-layer decoder: layers in 1..depth-1,
    strictly increasing (duplicates on very shallow decoders are dropped)."""
    out: list[int] = []
    for f in fractions:
        layer = min(depth - 1, max(1, round(f * depth)))
        if not out or layer > out[-1]:
            out.append(layer)
    return out


def mean_kept(layers: list[int], lam: float, depth: int) -> float:
    """Mean over the ``depth`` layers of the fraction of image tokens entering a layer when a ratio
    ``lam`` is kept before each of ``layers``."""
    edges = [*layers, depth]
    total = float(layers[0])
    for s, (start, end) in enumerate(zip(edges[:-1], edges[1:]), start=1):
        total += (end - start) * lam**s
    return total / depth


def solve_lam(budget: float, layers: list[int], depth: int) -> float:
    """λ in (0, 1] with ``mean_kept(layers, λ) == budget`` (bisection; the mean grows with λ)."""
    if budget >= 1.0:
        return 1.0
    if budget <= layers[0] / depth:
        raise BudgetError(
            f"budget: {budget} is not reachable with PyramidDrop stages before layers {layers} of {depth} "
            f"(minimum above {layers[0] / depth:.3f})",
            minimum=layers[0] / depth,
        )
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_kept(layers, mid, depth) < budget else (lo, mid)
    return (lo + hi) / 2


def schedule(budget: float, depth: int) -> tuple[list[int], float]:
    """Stage boundaries and λ for ``budget`` on a ``depth``-layer decoder (see the module docstring)."""
    official = boundaries(OFFICIAL, depth)
    if budget >= mean_kept(official, MIN_OFFICIAL_LAM, depth):
        return official, solve_lam(budget, official, depth)
    shallow = boundaries(SHALLOW, depth)
    first = earliest_layer(budget, shallow[0], depth)
    layers = [first] + [k for k in shallow[1:] if k > first]
    return layers, solve_lam(budget, layers, depth)


@register
@dataclass
class PyramidDrop(Method):
    """PyramidDrop: keep a ratio λ of the image tokens at each of 3 stage boundaries, ranked by the
    last instruction token's attention (RoPE) in the layer about to run (CVPR 2025)."""

    name = "pdrop"
    summary = "PyramidDrop: 4 stages, keep λ of the image tokens at each boundary by last-token attention (RoPE)"
    sites = ("llm",)
    lam: float | None = None
    layers: tuple[int, ...] | None = None
    positions: str = "renumber"

    @property
    def uses_budget(self) -> bool:
        return self.lam is None

    def plan(self, anatomy: Anatomy, budget: float | None) -> tuple[list[int], float]:
        """The stage boundaries and λ this instance uses on ``anatomy`` at ``budget``."""
        depth = anatomy.llm.num_layers
        option("positions", self.positions, ("renumber", "keep"))
        layers = None
        if self.layers is not None:
            layers = [int(k) for k in self.layers]
            if not layers or layers != sorted(set(layers)):
                raise MethodArgumentError(f"layers: stage boundaries must be strictly increasing; got {self.layers!r}")
        if self.lam is not None:
            if not 0.0 < self.lam <= 1.0:
                raise MethodArgumentError(f"lam: the kept ratio per stage must be in (0, 1]; got {self.lam!r}")
            return (layers or boundaries(OFFICIAL, depth)), float(self.lam)
        budget = require_budget(budget, self.name, "lam=")
        if layers is not None:
            return layers, solve_lam(budget, layers, depth)
        return schedule(budget, depth)

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        layers, lam = self.plan(anatomy, budget)
        positions = "keep" if lam == 1.0 else self.positions

        def select(ctx: Context):
            scores = ctx.score("last_token_attention", source="current", rope=True, normalize="all")
            return topk_per_row(scores, ctx.keep_counts(lam))

        return [Stage(f"{self.name}{s}", "llm", k, select, positions) for s, k in enumerate(layers, start=1)]
