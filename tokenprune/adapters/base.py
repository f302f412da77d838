"""What an adapter tells the engine about a model: where its layers are and how its visual tokens
are laid out. Methods and the engine only ever talk to these objects, never to model classes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ImageLayout:
    """Where each of one image's visual tokens (in the order they reach the LLM) comes from.

    ``tile[i]`` is 0 for the base image, 1.. for LLaVA-NeXT anyres tiles, -1 for a newline token and
    -2 for a CLS token; ``row[i]``/``col[i]`` are its patch coordinates inside its tile's grid
    (``grid`` rows x cols); ``y[i]``/``x[i]`` its centre in the whole image, normalised to [0, 1].
    ``partitions`` splits the tokens into the groups that methods budget separately (base image,
    each tile, newline tokens), as lists of token offsets.
    """

    tile: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    grid: tuple[int, int]
    partitions: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.tile.numel())


def grid_layout(rows: int, cols: int, cls: bool = False) -> ImageLayout:
    """Layout of a plain patch grid in raster order, optionally preceded by a CLS token."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.flatten(), c.flatten()
    tile = torch.zeros_like(r)
    y, x = (r.float() + 0.5) / rows, (c.float() + 0.5) / cols
    parts = {"base": torch.arange(rows * cols) + int(cls)}
    if cls:
        tile, r, c = (torch.cat([torch.tensor([v]), t]) for v, t in ((-2, tile), (0, r), (0, c)))
        y, x = torch.cat([torch.tensor([0.5]), y]), torch.cat([torch.tensor([0.5]), x])
        parts = {"cls": torch.tensor([0]), **parts}
    return ImageLayout(tile=tile, row=r, col=c, y=y, x=x, grid=(rows, cols), partitions=parts)


@dataclass
class VisionParts:
    """A ViT-style encoder: its layers, how to reach each layer's attention, its token geometry."""

    layers: nn.ModuleList
    attention: Callable[[nn.Module], nn.Module]
    input_norm: Callable[[nn.Module], nn.Module]
    has_cls: bool
    grid: tuple[int, int]
    mlp_norm: Callable[[nn.Module], nn.Module] | None = None  # the norm before the MLP (pre-norm layers)
    mlp: Callable[[nn.Module], nn.Module] | None = None  # the MLP, whose output the layer adds to its residual

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def num_heads(self, attn: nn.Module) -> int:
        return int(getattr(attn, "num_heads", None) or attn.num_attention_heads)

    @staticmethod
    def scale(attn: nn.Module) -> float:
        return float(getattr(attn, "scaling", None) or attn.scale)


@dataclass
class LLMParts:
    """A decoder-only language model: layers, attention, the pre-attention norm, rotary module."""

    layers: nn.ModuleList
    attention: Callable[[nn.Module], nn.Module]
    input_norm: Callable[[nn.Module], nn.Module]
    rotary: nn.Module
    config: object

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@dataclass
class Anatomy:
    """Everything the engine needs to know about one model.

    ``vlm_core`` is the module whose forward merges image features into the text sequence (a forward
    pre-hook there is the pre-LLM site); ``layouts`` maps the features of one forward's images to
    their :class:`ImageLayout` (``image_sizes`` is needed by LLaVA-NeXT, ``None`` otherwise).
    """

    name: str
    model: nn.Module
    vision: VisionParts
    llm: LLMParts | None = None
    vlm_core: nn.Module | None = None
    image_token_id: int | None = None
    feature_layer: int | None = None
    layouts: Callable[[list[int], torch.Tensor | None], list[ImageLayout]] | None = None
    pad_token_id: int = 0

    @property
    def is_vlm(self) -> bool:
        return self.llm is not None

    @property
    def sites(self) -> tuple[str, ...]:
        return ("vision", "pre_llm", "llm") if self.is_vlm else ("vision",)

    def attn_implementation(self, site: str) -> str:
        """The attention backend used at a site ("vision" or "llm")."""
        part = self.vision if site == "vision" else self.llm
        attn = part.attention(part.layers[0])
        return str(getattr(attn.config, "_attn_implementation", None) or "eager")
