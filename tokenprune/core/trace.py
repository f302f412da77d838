"""The record of one prefill: which original visual tokens each stage kept."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StageRecord:
    """One stage of a prefill. ``kept`` (B, n) holds the ORIGINAL visual-token indices kept after
    the stage, ascending, rows padded with -1 where samples keep different counts. ``info`` is the
    stage's static metadata (e.g. which variant of the method ran)."""

    name: str
    site: str
    layer: int
    kept: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def counts(self) -> torch.Tensor:
        """Visual tokens kept per sample (B,)."""
        return (self.kept >= 0).sum(-1)


@dataclass
class ExitRecord:
    """Early exit in one prefill and the decode steps after it (``method="early_exit"``).

    ``decode`` holds, per decode step (tokens after the first, which the full prefill produces),
    the (B,) decoder layers each sample ran, out of ``num_layers``. ``vision`` is the (T,) encoder
    layers run per encoded image / tile, out of ``vision_num_layers``; ``classify`` the (B,) encoder
    layers run before an exit head (or the final head) answered, for an encoder classifier."""

    num_layers: int = 0
    decode: list[torch.Tensor] = field(default_factory=list)
    vision: torch.Tensor | None = None
    vision_num_layers: int = 0
    classify: torch.Tensor | None = None

    @property
    def layers_per_token(self) -> torch.Tensor:
        """(B, steps) decoder layers run for each decoded token after the first."""
        if not self.decode:
            return torch.zeros(0, 0, dtype=torch.long)
        return torch.stack(self.decode, 1)

    @property
    def mean_decode_layers(self) -> float | None:
        """Mean decoder layers per decoded token (None before a decode step)."""
        return float(self.layers_per_token.float().mean()) if self.decode else None


@dataclass
class Trace:
    """What the last prefill kept.

    ``unpruned`` (B,) is each sample's visual-token count before any reduction; ``num_layers`` the
    number of layers the budget is averaged over and ``budget_site`` where they are: ``"llm"``
    (decoder layers of a VLM) or ``"vision"`` (layers of a standalone encoder). ``meta`` (VLMs)
    holds the geometry of every original visual token, (B, N) tensors indexed like ``kept``:
    ``image`` (which image / video of the sample), ``frame`` (video frame), ``tile``, ``row``,
    ``col``, ``y``, ``x``, ``partition`` (see :class:`~tokenprune.core.stage.Context`).
    """

    unpruned: torch.Tensor
    num_layers: int
    budget_site: str
    stages: list[StageRecord] = field(default_factory=list)
    early_exit: ExitRecord | None = None
    meta: dict[str, torch.Tensor] | None = None

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
