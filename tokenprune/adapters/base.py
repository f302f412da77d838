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
    each tile, newline tokens, each video frame), as lists of token offsets. ``frame[i]`` is the
    video frame (temporal patch) of a token, 0 for images (None: all 0).
    """

    tile: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    grid: tuple[int, int]
    partitions: dict[str, torch.Tensor] = field(default_factory=dict)
    frame: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.tile.numel())


def grid_layout(rows: int, cols: int, cls: bool = False, first: int = 0) -> ImageLayout:
    """Layout of a plain patch grid in raster order from patch ``first`` on (LLaVA's default feature
    strategy drops a CLS-less tower's patch 0), optionally preceded by a CLS token."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.flatten()[first:], c.flatten()[first:]
    tile = torch.zeros_like(r)
    y, x = (r.float() + 0.5) / rows, (c.float() + 0.5) / cols
    parts = {"base": torch.arange(r.numel()) + int(cls)}
    if cls:
        tile, r, c = (torch.cat([torch.tensor([v]), t]) for v, t in ((-2, tile), (0, r), (0, c)))
        y, x = torch.cat([torch.tensor([0.5]), y]), torch.cat([torch.tensor([0.5]), x])
        parts = {"cls": torch.tensor([0]), **parts}
    return ImageLayout(tile=tile, row=r, col=c, y=y, x=x, grid=(rows, cols), partitions=parts)


def frames_layout(frames: int, rows: int, cols: int, video: bool) -> ImageLayout:
    """``frames`` raster grids of ``rows`` x ``cols`` tokens, one after the other; each frame is
    its own partition for a video (an image's single grid is ``base``)."""
    one = grid_layout(rows, cols)
    n = rows * cols
    parts = {f"frame{t}": torch.arange(t * n, (t + 1) * n) for t in range(frames)}
    if not video:
        parts = {"base": torch.arange(n)}

    def cat(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([v] * frames)

    frame = torch.arange(frames).repeat_interleave(n)
    return ImageLayout(tile=cat(one.tile), row=cat(one.row), col=cat(one.col), y=cat(one.y), x=cat(one.x),
                       grid=(rows, cols), partitions=parts, frame=frame)


@dataclass
class VisionParts:
    """A ViT-style encoder: its layers, how to reach each layer's attention, its token geometry.

    ``tower`` says how images go through it: ``"batched"`` (CLIP/SigLIP: a (T, N, D) batch of
    images or tiles on one ``grid``, CLS first when ``has_cls``) or ``"packed"`` (Qwen: one
    (N_total, D) sequence of every image at its own resolution, ``cu_seqlens``, window attention).
    ``vision_site`` is None when vision-site stages (between encoder layers) can run inside the
    tower, else the reason they cannot (given in the typed error at ``patch()``). ``scorers``
    (packed towers) builds the pre-LLM site's encoder scores from the captured layers (see
    :mod:`tokenprune.core.prellm_site`); batched towers use the engine's CLS / key scorers.
    ``full_attention`` lists the layers whose attention spans whole images when the others attend
    within windows (Qwen2.5-VL); None when every layer does.
    """

    layers: nn.ModuleList
    attention: Callable[[nn.Module], nn.Module]
    input_norm: Callable[[nn.Module], nn.Module]
    has_cls: bool
    grid: tuple[int, int]
    mlp_norm: Callable[[nn.Module], nn.Module] | None = None  # the norm before the MLP (pre-norm layers)
    mlp: Callable[[nn.Module], nn.Module] | None = None  # the MLP, whose output the layer adds to its residual
    tower: str = "batched"
    vision_site: str | None = None
    scorers: Callable | None = None
    full_attention: tuple[int, ...] | None = None

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
    """A decoder-only language model: layers, attention, the pre-attention norm, rotary module and
    the final norm (applied after the last layer; None if the model has none).

    ``injections`` are methods the model calls between layers to add per-visual-token features
    (Qwen3-VL's ``_deepstack_process(hidden_states, visual_pos_masks, embeds)``); the engine slices
    their arguments after tokens were dropped inside the LLM."""

    layers: nn.ModuleList
    attention: Callable[[nn.Module], nn.Module]
    input_norm: Callable[[nn.Module], nn.Module]
    rotary: nn.Module
    config: object
    head_norms: Callable[[nn.Module], tuple] = field(default=lambda attn: (None, None))  # per-head q / k norms
    injections: tuple[tuple[nn.Module, str], ...] = ()  # (owner, method) adding features at visual positions
    norm: nn.Module | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@dataclass
class Modality:
    """One kind of visual input of a VLM (``"image"``, ``"video"``): the placeholder token its
    features replace in ``input_ids``, and how the model encodes it.

    ``encoder`` names the core's method ``generate()`` calls before prefill (``get_image_features``);
    the engine records the arguments it was called with, since ``generate()`` then drops them
    (``image_sizes``, ``image_grid_thw``). ``pixels`` are the forward inputs that carry the raw
    input. ``encode(inputs)`` runs the model's own encoder on a forward call's inputs and returns its
    output (``pooler_output``: one (n_i, D) tensor per image / video). ``layouts(lengths, inputs)``
    lays out each item's ``lengths[i]`` visual tokens; ``inputs`` are the forward inputs merged with
    the recorded encoder arguments. ``aligned`` names further encoder outputs that hold, per
    extra layer, one tensor per item aligned token for token with ``pooler_output`` (Qwen3-VL's
    ``deepstack_features``): they are pruned together with it. ``pack`` turns the kept per-item
    features back into the ``pooler_output`` the model reads (a list by default).
    """

    name: str
    token_id: int
    pixels: tuple[str, ...]
    encoder: str
    encode: Callable[[dict], object]
    layouts: Callable[[list[int], dict], list[ImageLayout]]
    aligned: tuple[str, ...] = ()
    pack: Callable[[list[torch.Tensor]], object] = list


@dataclass
class Sequence:
    """How visual features enter the language model's sequence.

    ``per_token`` are (B, L) inputs besides ``input_ids`` / ``attention_mask`` that travel with
    them and are compacted together (``mm_token_type_ids``). ``positions`` is ``"1d"`` (position ids
    (B, L), LLaVA) or ``"mrope"`` ((3|4, B, L) ids, Qwen): ``original_positions(inputs)`` gives the
    ids the model would use for the unpruned prompt (its own rope-index function, which also stores
    its decode offsets), and ``continuation(past, q, batch)`` the ids of ``q`` new tokens after
    ``past`` unpruned ones. ``feature_cls(inputs)`` is how many leading features of each image are
    not patches (a CLS token that LLaVA's ``"full"`` strategy feeds to the LLM).
    """

    modalities: tuple[Modality, ...]
    per_token: tuple[str, ...] = ()
    positions: str = "1d"
    original_positions: Callable[[dict], torch.Tensor] | None = None
    continuation: Callable[[int, int, int, torch.device], torch.Tensor] | None = None
    feature_cls: Callable[[dict], int] = field(default=lambda inputs: 0)


@dataclass
class Anatomy:
    """Everything the engine needs to know about one model.

    ``vlm_core`` is the module whose forward merges image features into the text sequence (a forward
    pre-hook there is the pre-LLM site); ``sequence`` says how they enter it (:class:`Sequence`).
    ``image_token_id`` is the image placeholder (the first modality's token).
    """

    name: str
    model: nn.Module
    vision: VisionParts
    llm: LLMParts | None = None
    vlm_core: nn.Module | None = None
    image_token_id: int | None = None
    feature_layer: int | None = None
    sequence: Sequence | None = None
    pad_token_id: int = 0

    def layouts(self, lengths: list[int], inputs: dict) -> list[ImageLayout]:
        """Layouts of the images of a forward call with ``lengths`` visual tokens each; ``inputs``
        holds what the adapter needs from the call (``image_sizes``, ``image_grid_thw``)."""
        return self.sequence.modalities[0].layouts(lengths, inputs)

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
