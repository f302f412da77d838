"""Baselines: random and uniform (spatially even) selection, usable before the LLM, inside the
LLM at a decoder layer, or between encoder layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import Anatomy
from ..core.budget import earliest_layer, require_budget, single_stage_keep, stack_depth
from ..core.select import allocate, grid_sample, pad_rows, random_subset
from ..core.stage import Context, Stage
from ..errors import MethodArgumentError, SiteError
from .base import Method, option, register

DEFAULT_LAYER = {"pre_llm": -1, "llm": 2, "vision": 1}


@dataclass
class _SiteMethod(Method):
    """A single-stage method whose site and layer the user may choose."""

    site: str | None = None
    layer: int | None = None
    keep: float | None = None

    @property
    def uses_budget(self) -> bool:
        return self.keep is None

    def _place(self, anatomy: Anatomy, budget: float | None) -> tuple[str, int]:
        """Site and layer; without an explicit ``layer`` a stack site moves to an earlier layer
        when the budget is not reachable at the default one."""
        site = self.site or ("pre_llm" if anatomy.is_vlm else "vision")
        if site == "vision" and anatomy.vision.vision_site:
            raise SiteError(f"site: 'vision' is refused on this {anatomy.name} model: {anatomy.vision.vision_site}; "
                            f"allowed: {[s for s in anatomy.sites if s != 'vision']}")
        option("site", site, anatomy.sites)
        if self.layer is not None:
            return site, int(self.layer)
        layer = DEFAULT_LAYER[site]
        stacked = site == "llm" or (site == "vision" and not anatomy.is_vlm)
        if stacked and self.keep is None and budget is not None:
            layer = earliest_layer(budget, layer, stack_depth(anatomy))
        return site, layer

    def _keep(self, anatomy: Anatomy, budget: float | None, site: str, layer: int) -> float:
        if self.keep is not None:
            if not 0.0 < self.keep <= 1.0:
                raise MethodArgumentError(f"keep: must be in (0, 1]; got {self.keep!r}")
            return float(self.keep)
        return single_stage_keep(require_budget(budget, self.name, "keep="), anatomy, site, layer)

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        site, layer = self._place(anatomy, budget)
        ratio = self._keep(anatomy, budget, site, layer)
        return [Stage(self.name, site, layer, lambda ctx: self.choose(ctx, ratio))]

    def choose(self, ctx: Context, ratio: float) -> torch.Tensor:
        raise NotImplementedError


@register
@dataclass
class Random(_SiteMethod):
    """Keep a uniformly random subset of the visual tokens. Each sample's draw depends only on
    ``seed`` (not on the rest of the batch)."""

    name = "random"
    summary = "random subset of visual tokens (seeded); baseline"
    seed: int = 0

    def choose(self, ctx: Context, ratio: float) -> torch.Tensor:
        k = ctx.keep_counts(ratio)
        return pad_rows([random_subset(int(n), int(kb), self.seed) for n, kb in zip(ctx.n, k)])


@register
@dataclass
class Uniform(_SiteMethod):
    """Keep visual tokens spread evenly over each image's patch grid: the budget is split over the
    image's partitions (base image, anyres tiles, newline tokens) in proportion to their size and
    each partition is sampled on an even lattice."""

    name = "uniform"
    summary = "spatially even grid sample of visual tokens; baseline"

    def choose(self, ctx: Context, ratio: float) -> torch.Tensor:
        rows = []
        for b, k in enumerate(ctx.keep_counts(ratio).tolist()):
            valid = ctx.valid[b].nonzero().flatten()
            part = ctx.meta["partition"][b, valid]
            ids = part.unique().tolist()
            members = [valid[part == p] for p in ids]
            shares = allocate(k, [m.numel() for m in members])
            chosen = [m[grid_sample(ctx.meta["row"][b, m], ctx.meta["col"][b, m], s)] for m, s in zip(members, shares)]
            rows.append(torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long))
        return pad_rows(rows)
