"""A stage is one place where a method reduces tokens; a context is what the method sees there."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .select import keep_counts

SITES = ("vision", "pre_llm", "llm")


@dataclass
class Stage:
    """Where a method acts and how it chooses.

    ``site`` is ``"vision"`` (before encoder layer ``layer``, i.e. on the output of layer
    ``layer - 1``), ``"pre_llm"`` (between projector and LLM; ``layer`` is -1) or ``"llm"``
    (before decoder layer ``layer`` >= 1). ``select(ctx)`` returns (B, K) positions into the
    context's candidate tokens (ascending, -1 padded); at the pre-LLM site it may instead return
    ``(positions, features)`` to hand the LLM new features (B, K, D) for the kept slots.
    ``positions`` (LLM site): ``"keep"`` leaves every token its original RoPE position,
    ``"renumber"`` numbers the remaining tokens 0..L'-1 from this layer on (PyramidDrop).
    """

    name: str
    site: str
    layer: int
    select: Callable[[Context], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    positions: str = "keep"


META = ("image", "partition", "tile", "row", "col", "y", "x")


@dataclass
class Context:
    """The candidates of one stage: the visual tokens still alive, per sample (padded rows).

    ``orig`` (B, N) are their original visual-token indices (-1 = padding), ``n`` (B,) how many
    each row has. ``meta`` holds per-candidate geometry from the adapter's layouts: ``image``
    (which image of the sample), ``partition`` (base image / tile / newline group id, unique per
    sample), ``tile``, ``row``, ``col`` (patch coordinates in the tile) and ``y``, ``x``
    (normalised centre in the image). ``features`` are the candidates' vectors at this site
    (B, N, D): projected image features before the LLM, hidden states in the encoder or LLM.
    """

    site: str
    layer: int
    orig: torch.Tensor
    meta: dict[str, torch.Tensor]
    features: torch.Tensor
    scorers: dict[str, Callable[..., torch.Tensor]] = field(default_factory=dict)

    @property
    def n(self) -> torch.Tensor:
        return (self.orig >= 0).sum(-1)

    @property
    def valid(self) -> torch.Tensor:
        return self.orig >= 0

    def keep_counts(self, ratio: float) -> torch.Tensor:
        """Tokens each sample keeps at ``ratio`` of its candidates (B,)."""
        return keep_counts(self.n, ratio)

    def score(self, name: str, **kwargs) -> torch.Tensor:
        """A score per candidate (B, N), -inf at padding. Names available at this site are in
        ``scorers`` (e.g. ``"last_token_attention"`` in the LLM, ``"cls_attention"`` in the
        encoder)."""
        if name not in self.scorers:
            raise KeyError(
                f"score {name!r} is not available at the {self.site} site; available: {sorted(self.scorers)}"
            )
        s = self.scorers[name](**kwargs)
        return s.masked_fill(~self.valid, float("-inf"))
