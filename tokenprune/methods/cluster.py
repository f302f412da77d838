"""Token clustering + reconstruction — Liang et al., "Expediting Large-Scale Vision Transformer for
Dense Prediction without Fine-tuning", NeurIPS 2022, §3.2-3.3 (official code:
Expedit-LargeScale-Vision-Transformer, e.g. Expedit-SAM ``hourglass_image_encoder.py``).

Algorithm:

1. *Token clustering layer* (before encoder layer ``alpha``): the h x w patch-token map is
   average-pooled to an ``hc x wc`` grid of initial centres; ``iters`` rounds of local soft k-means
   follow — every token spreads over the centres within ``window`` cells of its initial cell with
   weights ``softmax(-temperature * ||x - c||^2)``, and every centre becomes the weighted mean of its
   tokens. The layers from ``alpha`` on run on the ``hc * wc`` centres (plus CLS).
2. *Token reconstruction layer* (before encoder layer ``beta``): every original token is rebuilt as a
   weighted sum of the current clustered tokens, with weights ``exp(-temperature * ||f - c||^2)``
   between its features before clustering ``f`` and the centres ``c`` as they left the clustering
   layer, kept for the ``k`` nearest centres and L2-normalised (as the official code does). The
   layers from ``beta`` on run on all patches again, so the output keeps every patch position and a
   dense head still works.

Defaults follow Expedit-SAM (``iters=3``, ``temperature=0.1``, ``k=36``); its window of 12 cells is
larger than the small grids used here, so the default ``window=5`` (radius 2 cells, the
official constraint is odd sizes) is given instead. Deviation: the weights are computed in log space
(same values, no underflow to all-zero rows for distant tokens).

Each cluster takes the slot of the patch at its cell's centre (the trace's kept index); clusters
carry no size (the paper uses no proportional attention). ``budget`` (standalone encoder: mean over
encoder layers of the visual tokens entering a layer) sets the number of clusters for the given
``alpha`` / ``beta``; ``clusters`` (an int, the nearest grid of about that many cells, or
``(hc, wc)``) sets it directly. The reconstruction must come before the last encoder layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters.base import Anatomy
from ..core.merge import grid_init, local_window, reconstruct, reconstruction_weights, soft_kmeans
from ..core.stage import Context, Reduction, Stage
from ..errors import BudgetError, MethodArgumentError
from .base import Method, register


def cluster_grid(rows: int, cols: int, count: float) -> tuple[int, int]:
    """The ``hc x wc`` grid (hc <= rows, wc <= cols) whose cell count is nearest ``count``, most
    square-like (aspect of the patch grid) among ties."""
    best = None
    for hc in range(1, rows + 1):
        for wc in range(1, cols + 1):
            key = (abs(hc * wc - count), abs(math.log(hc / wc) - math.log(rows / cols)))
            if best is None or key < best[0]:
                best = (key, (hc, wc))
    return best[1]


def cell_centres(rows: int, cols: int, hc: int, wc: int) -> torch.Tensor:
    """Raster index of the patch at the centre of every cell of an ``hc x wc`` grid (ascending)."""
    r = ((torch.arange(hc) + 0.5) * rows / hc).floor().long()
    c = ((torch.arange(wc) + 0.5) * cols / wc).floor().long()
    return (r[:, None] * cols + c[None]).flatten()


@register
@dataclass
class Cluster(Method):
    """Expedit: cluster patch tokens into a coarse grid before layer alpha, rebuild all patches before layer beta."""

    name = "cluster"
    summary = "token clustering (local soft k-means) before layer alpha + reconstruction of every patch before beta"
    sites = ("vision",)
    alpha: int = 1
    beta: int | None = None
    clusters: int | tuple[int, int] | None = None
    iters: int = 3
    temperature: float = 0.1
    window: int = 5
    k: int = 36

    @property
    def uses_budget(self) -> bool:
        return self.clusters is None

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        vp = anatomy.vision
        depth = vp.num_layers
        beta = depth - 1 if self.beta is None else self.beta
        if not 1 <= self.alpha < beta <= depth - 1:
            raise MethodArgumentError(
                f"alpha/beta: need 1 <= alpha < beta <= {depth - 1} (encoder layers); got {self.alpha}, {beta}"
            )
        if self.window < 1 or self.window % 2 == 0:
            raise MethodArgumentError(f"window: an odd number of cells >= 1; got {self.window!r}")
        rows, cols = vp.grid
        n = rows * cols
        hc, wc = self.grid(anatomy, budget, rows, cols, beta - self.alpha)
        if hc * wc >= n:  # nothing to cluster: identity
            return [Stage(self.name, "vision", self.alpha, lambda ctx: torch.arange(n).expand(ctx.orig.shape[0], n))]
        saved: dict = {}
        slots = cell_centres(rows, cols, hc, wc)
        allowed = local_window(grid_init(torch.zeros(1, n, 1), rows, cols, hc, wc)[1], hc, wc, self.window // 2)

        def cluster(ctx: Context) -> Reduction:
            if ctx.orig.shape[1] != n:
                raise MethodArgumentError(f"{self.name}: clustering needs every patch at layer {self.alpha}")
            x = ctx.features
            centres, _ = grid_init(x, rows, cols, hc, wc)
            centres = soft_kmeans(x, centres, allowed.to(x.device), self.iters, self.temperature)
            saved["weights"] = reconstruction_weights(x, centres, self.k, self.temperature)
            return Reduction(centres, slots.to(ctx.orig.device).expand(x.shape[0], -1))

        def rebuild(ctx: Context) -> Reduction:
            weights = saved.pop("weights")
            tokens = reconstruct(weights.to(ctx.features.device), ctx.features)
            return Reduction(tokens, torch.arange(n, device=ctx.orig.device).expand(tokens.shape[0], n))

        return [
            Stage(f"{self.name}_cluster", "vision", self.alpha, cluster),
            Stage(f"{self.name}_reconstruct", "vision", beta, rebuild),
        ]

    def grid(self, anatomy: Anatomy, budget: float | None, rows: int, cols: int, span: int) -> tuple[int, int]:
        """Cluster grid from ``clusters`` or from the budget."""
        if self.clusters is not None:
            if isinstance(self.clusters, int):
                if self.clusters < 1:
                    raise MethodArgumentError(f"clusters: must be >= 1; got {self.clusters}")
                return cluster_grid(rows, cols, self.clusters)
            hc, wc = self.clusters
            if not (1 <= hc <= rows and 1 <= wc <= cols):
                raise MethodArgumentError(f"clusters: a grid within {rows} x {cols}; got {self.clusters}")
            return int(hc), int(wc)
        if budget is None or anatomy.is_vlm:
            raise MethodArgumentError(
                f"clusters: {self.name} needs clusters= (or a budget on a standalone encoder: every patch "
                "is rebuilt, so a VLM's LLM sees them all)"
            )
        depth = anatomy.vision.num_layers
        ratio = 1 - (1 - budget) * depth / span
        if ratio <= 0:
            raise BudgetError(
                f"budget: {budget} is not reachable with clusters between layers {self.alpha} and "
                f"{self.alpha + span} of {depth} (minimum above {1 - span / depth:.3f}); widen alpha..beta",
                minimum=1 - span / depth,
            )
        return cluster_grid(rows, cols, ratio * rows * cols)
