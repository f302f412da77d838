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
    ``capture`` (pre-LLM site): encoder layers whose attention inputs the stage reads through
    ``ctx.score("cls_attention", layer=...)`` / ``ctx.score("keys", layer=...)``, and whose outputs
    through ``ctx.get("hidden", layer=...)``.
    At the vision site ``select`` may return a :class:`Reduction` instead of positions, to merge
    or rebuild tokens rather than drop them. ``placement`` (vision site): ``"input"`` acts on the
    input of layer ``layer``; ``"mid"`` acts inside layer ``layer - 1``, between its attention and
    its MLP (ToMe's placement), so that MLP already runs on the reduced tokens: ``select`` sees the
    residual stream after that layer's attention and must return a :class:`Reduction` with
    ``assign`` (a linear merge: the MLP output is copied back to every member token and the layer's
    output merged again at the input of layer ``layer``, which equals merging before the MLP).
    """

    name: str
    site: str
    layer: int
    select: Callable[[Context], torch.Tensor | tuple[torch.Tensor, torch.Tensor] | Reduction]
    positions: str = "keep"
    capture: tuple[int, ...] = ()
    placement: str = "input"
    info: dict = field(default_factory=dict)


@dataclass
class Reduction:
    """New patch tokens for a vision-site stage that merges or rebuilds instead of dropping.

    ``tokens`` (T, K, D) replace the candidate tokens; ``orig`` (T, K) are the original patch
    indices they stand for (a merged token: its destination's index), ascending; ``size`` (T, K),
    if given, is how many original patches each token averages and turns on proportional
    attention (log size added to the attention logits of every later layer, as ToMe does).
    ``assign`` (T, N), for merges, is the output slot of every candidate, the tokens being the
    size-weighted averages of their slots (required by ``placement="mid"`` stages).
    """

    tokens: torch.Tensor
    orig: torch.Tensor
    size: torch.Tensor | None = None
    assign: torch.Tensor | None = None


META = ("image", "partition", "tile", "row", "col", "y", "x", "frame")


@dataclass
class Context:
    """The candidates of one stage: the visual tokens still alive, per sample (padded rows).

    ``orig`` (B, N) are their original visual-token indices (-1 = padding), ``n`` (B,) how many
    each row has. ``meta`` holds per-candidate geometry from the adapter's layouts: ``image``
    (which image of the sample), ``partition`` (base image / tile / newline group id, unique per
    sample), ``tile``, ``row``, ``col`` (patch coordinates in the tile), ``y``, ``x``
    (normalised centre in the image) and ``frame`` (video frame, 0 for images). ``features`` are
    the candidates' vectors at this site (B, N, D): projected image features before the LLM,
    hidden states in the encoder or LLM.
    ``size`` (vision site) is how many original patches each candidate averages (after merging).
    ``project`` (pre-LLM site) maps encoder features (e.g. ``ctx.get("hidden", layer=...)``, the
    output of a captured encoder layer, or sums of them) into the LLM's feature space with the
    model's own projector, for methods that merge before projection (VisionZip).

    ``scorers`` by site (``get(name, ...)``): in the encoder ``cls_attention``, ``keys``; before
    the LLM ``cls_attention``, ``keys``, ``hidden`` (captured encoder layers), ``instruction``
    (B, T) the token ids of each sample's text after its last image (-1 padded) and ``embed``
    (ids -> the LLM's input embeddings); in the LLM ``last_token_attention`` and, over every
    column of the sequence entering layer K, ``columns`` (B, N) the candidates' columns,
    ``sequence`` (B, L) each column's index among the sample's real tokens (-1 at padding),
    ``visual`` (B, L) original visual index or -1, ``keys`` (B, L, H_kv * d) layer K-1's keys
    after RoPE, heads concatenated, and ``hidden`` (B, L, D) layer K-1's output (``norm="final"``:
    after the model's final norm).
    """

    site: str
    layer: int
    orig: torch.Tensor
    meta: dict[str, torch.Tensor]
    features: torch.Tensor
    scorers: dict[str, Callable[..., torch.Tensor]] = field(default_factory=dict)
    size: torch.Tensor | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def n(self) -> torch.Tensor:
        return (self.orig >= 0).sum(-1)

    @property
    def valid(self) -> torch.Tensor:
        return self.orig >= 0

    def keep_counts(self, ratio: float) -> torch.Tensor:
        """Tokens each sample keeps at ``ratio`` of its candidates (B,)."""
        return keep_counts(self.n, ratio)

    def get(self, name: str, **kwargs) -> torch.Tensor:
        """A per-candidate quantity by name, e.g. ``"keys"`` (B, N, d). Names available at this
        site are the keys of ``scorers``."""
        if name not in self.scorers:
            raise KeyError(f"{name!r} is not available at the {self.site} site; available: {sorted(self.scorers)}")
        return self.scorers[name](**kwargs)

    def score(self, name: str, **kwargs) -> torch.Tensor:
        """A score per candidate (B, N), -inf at padding: ``"last_token_attention"`` in the LLM,
        ``"cls_attention"`` in the encoder and before the LLM."""
        return self.get(name, **kwargs).masked_fill(~self.valid, float("-inf"))
