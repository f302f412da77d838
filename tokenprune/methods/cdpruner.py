"""CDPruner — Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for
Token Pruning in MLLMs", NeurIPS 2025 (arXiv 2506.10967), §3.

Algorithm (paper §3.2-3.3; official ``encode_images`` in Theia-4869/CDPruner's ``llava_arch.py`` and
``clip_encoder.py``), per crop (LLaVA-1.5's image; LLaVA-NeXT's base view and every anyres tile):

1. *Similarity*: cosine similarity ``S`` of the crop's projected visual tokens (the projector's
   output, normalised in its own dtype, then float32).
2. *Relevance* of every visual token to the instruction (below), min-max normalised over all crops
   of the image together: ``r = (r - min + 1e-6) / (max - min)``; optionally ``r = exp(alpha r)``
   with ``alpha = theta / (2 (1 - theta))`` (the official code's commented-out ``theta``; off by
   default).
3. *Conditional DPP*: kernel ``L = diag(r) S diag(r)`` (float32); greedy MAP inference with the fast
   Cholesky-style update (Chen et al., NeurIPS 2018): pick ``argmax d_i^2`` (first maximum), extend
   every token's Cholesky row ``e = (L_j - c_j . c) / sqrt(d_j^2)``, ``d^2 -= e^2``, until ``T``
   tokens are chosen; kept tokens in original order.

Relevance, two variants (the one that ran is in ``trace.stage("cdpruner").info["relevance"]``):

* ``"clip"`` (the official LLaVA code), with ``text_encoder=`` a transformers ``CLIPModel`` (the
  CLIP the vision tower came from), ``text_tokenizer=`` its tokenizer and ``tokenizer=`` the VLM's
  (to decode the instruction): image embeddings ``visual_projection(post_layernorm(h))`` of the
  feature layer's patch outputs ``h`` (projection in float32), text embeddings of the instruction
  (one row per 77-token segment, zero-padded, no truncation, as officially), relevance
  ``mean_m(-cos(image_i, text_m))`` — the minus sign is in the official code.
* ``"llm"`` (default without a text encoder; what OpenVINO GenAI's CDPruner does for Qwen2-VL, whose
  tower has no text side): text embeddings are the LLM's input embeddings of the instruction tokens,
  image embeddings the projected visual tokens, relevance ``mean_m(+cos(image_i, text_m))`` (OpenVINO's
  ``use_negative_relevance = false`` for non-CLIP models). Normalised as above (OpenVINO divides by
  the range without the 1e-6). With no instruction text, relevance is 1 for every token (plain DPP).

The instruction is each sample's text after its last image (the question and the template's tail,
e.g. ``ASSISTANT:``; the official code passes the benchmark's bare question, trimmed per benchmark).

``budget`` b keeps ``round(b * n)`` of an image's ``n`` visual tokens (newline and CLS tokens count
in ``n`` and are dropped), split over its crops in proportion to their sizes after unpadding (the
official code keeps ``T`` per padded crop). Deviations: when the kernel's rank is exhausted before
``T`` picks (``d^2`` no longer positive; the official loop then goes NaN and keeps fewer tokens) the
remaining picks go to the most relevant unchosen tokens; every sample and image of a batch is pruned
(the official code: batch 1, CUDA streams); kept tokens keep their original position ids (the
engine's convention before the LLM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..adapters.base import Anatomy
from ..core.budget import require_budget
from ..core.stage import Context, Stage
from ..errors import MethodArgumentError
from ._images import crops, per_image
from ._tower import feature_layers
from .base import Method, option, register


def dpp_map(kernel: torch.Tensor, k: int, fallback: torch.Tensor) -> torch.Tensor:
    """Greedy MAP of a DPP with kernel (n, n): ``k`` positions in pick order. Once no token adds
    volume (``d^2 <= 0``), the rest follow ``fallback`` (positions by preference)."""
    n = kernel.shape[0]
    cis = kernel.new_zeros(k, n)
    di2s = kernel.diagonal().clone()
    picks: list[int] = []
    for i in range(k):
        j = int(di2s.argmax())
        if not bool(di2s[j] > 0):
            rest = [int(t) for t in fallback if int(t) not in set(picks)]
            return torch.tensor(picks + rest[: k - len(picks)], dtype=torch.long)
        picks.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s = di2s - eis.square()
        di2s[j] = float("-inf")
    return torch.tensor(picks, dtype=torch.long)


def conditional_dpp(feats: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """CDPruner's choice among one crop's tokens: projected features (n, D), relevance (n,)."""
    x = feats / feats.norm(dim=-1, keepdim=True)
    x = x.float()
    kernel = relevance[:, None] * (x @ x.T) * relevance[None, :]
    return dpp_map(kernel, k, relevance.argsort(descending=True, stable=True).cpu())


def min_max(r: torch.Tensor) -> torch.Tensor:
    """The official normalisation ``(r - min + 1e-6) / (max - min)``."""
    return (r - r.min() + 1e-6) / (r.max() - r.min())


def mean_cosine(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Mean over text rows of the cosine similarity of every image row (n,), float32."""
    image, text = image.float(), text.float()
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return (image @ text.T).mean(-1)


@register
@dataclass
class CDPruner(Method):
    """CDPruner: conditional DPP over each crop's visual tokens, kernel = relevance x similarity x relevance."""

    name = "cdpruner"
    summary = "CDPruner: conditional DPP (instruction relevance x feature similarity), greedy MAP per crop"
    sites = ("pre_llm",)
    relevance: str = "auto"
    text_encoder: Any = None
    text_tokenizer: Any = None
    tokenizer: Any = None
    theta: float | None = None

    def variant(self) -> str:
        option("relevance", self.relevance, ("auto", "clip", "llm"))
        mode = self.relevance if self.relevance != "auto" else ("clip" if self.text_encoder is not None else "llm")
        if mode == "clip":
            missing = [n for n in ("text_encoder", "text_tokenizer", "tokenizer") if getattr(self, n) is None]
            if missing:
                raise MethodArgumentError(f"{', '.join(missing)}: relevance='clip' needs a CLIPModel (text_encoder), "
                                          "its tokenizer (text_tokenizer) and the VLM's tokenizer (tokenizer)")
            for attr in ("text_model", "text_projection", "visual_projection", "vision_model"):
                if not hasattr(self.text_encoder, attr):
                    raise MethodArgumentError(f"text_encoder: expected a transformers CLIPModel (it has no {attr})")
        return mode

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        budget = require_budget(budget, self.name, "budget=")
        if self.theta is not None and not 0.0 <= self.theta < 1.0:
            raise MethodArgumentError(f"theta: must be in [0, 1); got {self.theta!r}")
        mode = self.variant()
        layers = feature_layers(anatomy) if mode == "clip" else []
        if len(layers) > 1:
            raise MethodArgumentError(f"relevance: 'clip' reads one feature layer; this model uses {len(layers)}")

        def select(ctx: Context) -> torch.Tensor:
            texts = self.text_embeddings(ctx, mode)
            image_side = ctx.get("hidden", layer=layers[0]) if mode == "clip" else ctx.features

            def choose(b: int, members: torch.Tensor, total: int) -> torch.Tensor:
                parts = crops(ctx, b, members, total)
                patches = torch.cat([c for c, _ in parts])
                rel = self.relevance_of(image_side[b, patches.to(image_side.device)], texts[b], mode)
                kept, off = [], 0
                for crop, k in parts:
                    r = rel[off: off + crop.numel()]
                    off += crop.numel()
                    if k > 0:
                        kept.append(crop[conditional_dpp(ctx.features[b, crop.to(ctx.features.device)], r, k)])
                return torch.cat(kept) if kept else members[:0]

            return per_image(ctx, budget, choose)

        info = {"relevance": "clip text encoder" if mode == "clip" else "llm input embeddings", "theta": self.theta}
        return [Stage(self.name, "pre_llm", -1, select, capture=tuple(layers), info=info)]

    def relevance_of(self, image: torch.Tensor, text: torch.Tensor | None, mode: str) -> torch.Tensor:
        """Normalised relevance (n,) of an image's patch tokens to the instruction."""
        if text is None or text.shape[0] == 0:
            rel = torch.ones(image.shape[0], device=image.device)
        else:
            if mode == "clip":
                clip = self.text_encoder
                h = clip.vision_model.post_layernorm(image)
                w = clip.visual_projection.weight
                rel = -mean_cosine(F.linear(h.float(), w.float()), text)
            else:
                rel = mean_cosine(image, text.to(image.device))
            rel = min_max(rel) if rel.numel() > 1 and float(rel.max() - rel.min()) > 0 else torch.ones_like(rel)
        if self.theta is not None:
            rel = torch.exp(self.theta / (2 * (1 - self.theta)) * rel)
        return rel

    def text_embeddings(self, ctx: Context, mode: str) -> list[torch.Tensor | None]:
        """Per sample, the instruction's text embeddings (M, C)."""
        ids = ctx.get("instruction")
        out = []
        for row in ids:
            row = row[row >= 0]
            if row.numel() == 0:
                out.append(None)
            elif mode == "llm":
                out.append(ctx.get("embed", token_ids=row))
            else:
                out.append(self.clip_text(self.tokenizer.decode(row.tolist(), skip_special_tokens=True).strip()))
        return out

    def clip_text(self, text: str) -> torch.Tensor:
        """Official text side: CLIP text embeddings of ``text``, one row per 77-token segment."""
        clip = self.text_encoder
        length = int(clip.config.text_config.max_position_embeddings)
        enc = self.text_tokenizer(text=[text], return_tensors="pt")
        segments = math.ceil(enc["input_ids"].shape[1] / length)
        pad = segments * length - enc["input_ids"].shape[1]
        device = clip.text_projection.weight.device
        enc = {k: torch.cat([v, v.new_zeros(v.shape[0], pad)], 1).view(-1, length).to(device)
               for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            return clip.text_projection(clip.text_model(**enc).pooler_output)
