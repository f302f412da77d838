"""The record of one prefill: which original visual tokens each stage kept."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StageRecord:
    """One stage of a prefill. ``kept`` (B, n) holds the ORIGINAL visual-token indices kept after
    the stage, ascending, rows padded with -1 where samples keep different counts."""

    name: str
    site: str
    layer: int
    kept: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        """Visual tokens kept per sample (B,)."""
        return (self.kept >= 0).sum(-1)


@dataclass
class Trace:
    """What the last prefill kept.

    ``unpruned`` (B,) is each sample's visual-token count before any reduction; ``num_layers`` the
    number of layers the budget is averaged over and ``budget_site`` where they are: ``"llm"``
    (decoder layers of a VLM) or ``"vision"`` (layers of a standalone encoder).
    """

    unpruned: torch.Tensor
    num_layers: int
    budget_site: str
    stages: list[StageRecord] = field(default_factory=list)

    def tokens_entering(self, layer: int) -> torch.Tensor:
        """Visual tokens per sample entering ``layer`` of the budgeted stack (B,)."""
        n = self.unpruned
        for st in self.stages:  # in execution order
            if st.site != self.budget_site or st.layer <= layer:
                n = st.counts
        return n

    @property
    def visual_tokens_per_layer(self) -> list[float]:
        """Mean over the batch of visual tokens entering each budgeted layer."""
        return [float(self.tokens_entering(j).float().mean()) for j in range(self.num_layers)]

    @property
    def realized_budget(self) -> float:
        """Visual tokens summed over layers and samples, over the unpruned sum."""
        total = float(self.unpruned.sum()) * self.num_layers
        if total == 0:
            return 1.0
        return sum(float(self.tokens_entering(j).sum()) for j in range(self.num_layers)) / total

    def stage(self, name: str) -> StageRecord:
        """The stage called ``name``."""
        for st in self.stages:
            if st.name == name:
                return st
        raise KeyError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")
