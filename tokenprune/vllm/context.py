"""The pre-LLM :class:`~tokenprune.core.stage.Context` built from vLLM-side tensors, so a served
model runs the very ``stage.select`` the Hugging Face hooks run (``core/prellm_site.py`` builds the
same context from transformers' tensors). Pure torch: vLLM's modules reach it only through
:class:`TowerCapture`.

One context row is one image (vLLM encodes and caches images independently of the request they
came in, so an image's selection may depend on that image alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..adapters.base import ImageLayout
from ..core.masks import gather_cols
from ..core.select import pad_rows
from ..core.stage import Context, Stage
from ..core.state import row_meta, take_meta
from ..errors import SiteError
from .spec import PROMPT_REASON


@dataclass
class TowerCapture:
    """What the vision tower's layers saw in one encoder call, for the stage's ``capture`` layers.

    ``inputs[layer]`` is the layer's normalised attention input and ``outputs[layer]`` its output,
    both (T, S, D) over the T tower rows (crops) of the call; ``heads(layer)`` returns this
    process's query of token 0 (T, h, 1, d) and keys (T, h, S, d) at that layer, ``num_heads`` the
    heads of all processes together, ``scale`` the attention scale and ``reduce`` sums a tensor
    over the tensor-parallel processes that hold the other heads (identity on one process).
    """

    heads: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    outputs: dict[int, torch.Tensor]
    num_heads: int
    scale: float
    has_cls: bool
    grid: tuple[int, int]
    reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)

    def scorers(self, geometry: dict[str, torch.Tensor], tower_row: torch.Tensor) -> dict:
        return tower_scorers(self, geometry, tower_row)


@dataclass
class PackedCapture:
    """What a packed tower (Qwen2.5-VL: the images of one encoder call in one sequence, windowed
    blocks, no CLS) gave, as per-image scores: ``scores[name](layer, **kw)`` returns one tensor per
    image (N_b, ...), token for token as the LLM sees them (``received_attention``, ``keys``)."""

    scores: dict[str, Callable[..., list[torch.Tensor]]]

    def scorers(self, geometry: dict[str, torch.Tensor], tower_row: torch.Tensor) -> dict:
        width = tower_row.shape[1]

        def make(name: str):
            def score(layer: int, **kwargs) -> torch.Tensor:
                per_image = self.scores[name](layer, **kwargs)
                out = per_image[0].new_zeros(len(per_image), width, *per_image[0].shape[1:])
                for b, v in enumerate(per_image):
                    out[b, : v.shape[0]] = v
                return out

            return score

        return {name: make(name) for name in self.scores}


def tower_scorers(capture: TowerCapture, geometry: dict[str, torch.Tensor], tower_row: torch.Tensor) -> dict:
    """``cls_attention``, ``keys`` and ``hidden`` per candidate, as the HF pre-LLM site defines them:
    a patch candidate reads its crop's row (``tower_row``) at token ``has_cls + row * cols + col``;
    CLS and newline candidates get -inf attention and zero vectors."""
    patch = geometry["tile"] >= 0
    token = torch.where(patch, int(capture.has_cls) + geometry["row"] * capture.grid[1] + geometry["col"], 0)
    rows = torch.where(patch, tower_row, 0)

    def pick(values: torch.Tensor, fill: float) -> torch.Tensor:
        out = values[rows.to(values.device), token.to(values.device)]
        mask = (~patch).to(values.device).view(*patch.shape, *([1] * (out.dim() - 2)))
        return out.masked_fill(mask, fill)

    def cls_attention(layer: int, heads: str = "mean") -> torch.Tensor:
        q, k = capture.heads(layer)
        a = ((q.float() @ k.float().transpose(-1, -2)) * capture.scale).softmax(-1)[:, :, 0]  # (T, h, S)
        total = capture.reduce(a.sum(1))
        return pick(total if heads == "sum" else total / capture.num_heads, float("-inf"))

    def keys(layer: int) -> torch.Tensor:
        _, k = capture.heads(layer)
        return pick(capture.reduce(k.sum(1)) / capture.num_heads, 0.0)

    def hidden(layer: int) -> torch.Tensor:
        return pick(capture.outputs[layer], 0.0)

    return {"cls_attention": cls_attention, "keys": keys, "hidden": hidden}


def image_context(
    features: list[torch.Tensor],
    layouts: list[ImageLayout],
    tower_rows: list[torch.Tensor],
    capture: TowerCapture | PackedCapture | None,
    project: Callable[[torch.Tensor], torch.Tensor] | None,
) -> Context:
    """The context of one encoder call: row b holds image b's tokens (``features[b]`` (N_b, H) in
    the order they would reach the LLM, laid out by ``layouts[b]``); ``tower_rows[b]`` (N_b,) is the
    tower row (crop) of each of them (read by a :class:`TowerCapture`)."""
    cand = pad_rows([torch.arange(f.shape[0]) for f in features])
    geometry = take_meta(row_meta([[lay] for lay in layouts]), cand)
    row_feats = features[0].new_zeros(len(features), cand.shape[1], features[0].shape[-1])
    tower_row = torch.zeros(cand.shape, dtype=torch.long)
    for b, (f, tr) in enumerate(zip(features, tower_rows)):
        row_feats[b, : f.shape[0]] = f
        tower_row[b, : f.shape[0]] = tr
    scorers = {"instruction": reads_prompt, "embed": reads_prompt}  # an image is encoded without its prompt
    if capture is not None:
        scorers.update(capture.scorers(geometry, tower_row))
    return Context("pre_llm", -1, cand, geometry, row_feats, scorers, project=project)


def select(stage: Stage, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the stage: kept original indices (B, K; -1 padded, ascending) and their features (B, K, H)
    (the stage's own features when it makes new ones, as VisionZip's contextual tokens)."""
    sel = stage.select(ctx)
    sel, feats = sel if isinstance(sel, tuple) else (sel, gather_cols(ctx.features, sel.to(ctx.features.device)))
    kept = torch.where(sel >= 0, torch.gather(ctx.orig, 1, sel.clamp(min=0).cpu()), -1)
    return kept, feats


def reads_prompt(**_) -> torch.Tensor:
    """The ``instruction`` / ``embed`` scorers of a served context: an image's encoding cannot depend on
    the request's text (see ``spec.PROMPT_REASON``)."""
    raise SiteError(f"method: a served method may not read the prompt: {PROMPT_REASON}")


def dry_run_counts(stage: Stage, layouts: list[ImageLayout]) -> list[int]:
    """How many tokens the stage keeps of each image, found by running it on placeholder data of the
    images' geometry: the count must follow from geometry and budget alone (vLLM sizes the prompt
    before the encoder runs); the served model checks every real selection against it."""
    g = torch.Generator().manual_seed(0)
    dim = 4
    n_tok = [lay.num_tokens for lay in layouts]
    width = max(n_tok)
    values = {
        "att": torch.rand(len(layouts), width, generator=g),
        "keys": torch.randn(len(layouts), width, dim, generator=g),
        "hidden": torch.randn(len(layouts), width, dim, generator=g),
    }

    def fake(name: str, fill: float):
        def score(layer: int = 0, **_) -> torch.Tensor:
            v = values[name]
            mask = ctx.valid.view(*ctx.valid.shape, *([1] * (v.dim() - 2)))
            return v.masked_fill(~mask, fill)

        return score

    features = [torch.randn(n, dim, generator=g) for n in n_tok]
    rows = [torch.zeros(n, dtype=torch.long) for n in n_tok]
    ctx = image_context(features, layouts, rows, None, lambda x: x[..., :dim])
    att = fake("att", float("-inf"))
    ctx.scorers.update(cls_attention=att, received_attention=att, keys=fake("keys", 0.0), hidden=fake("hidden", 0.0))
    kept, _ = select(stage, ctx)
    return (kept >= 0).sum(-1).tolist()
