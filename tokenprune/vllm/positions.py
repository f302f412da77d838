"""Original RoPE positions for a shortened prompt, through vLLM's M-RoPE position path.

tokenprune's Hugging Face path keeps every surviving token at its ORIGINAL position: the kept image
tokens where they were (LLaVA: ``image start + original index`` on the one 1-D axis; Qwen2.5-VL: the
3-D M-RoPE position ``image start + (t, h, w)`` of the token's merged unit), the text after an image
where it was, and decoding continuing from the unpruned length. vLLM numbers a prompt contiguously,
except for M-RoPE models, whose per-token positions a model computes itself
(``get_mrope_input_positions``) when a request arrives, before the encoder runs. For a 1-D RoPE model
the three M-RoPE rows are equal, which is exactly 1-D RoPE.

Before encoding only the counts are known: text positions are final and an image's K placeholders
all get the image's start position. After encoding, each kept embedding row carries its offset from
that start, one non-negative integer per position axis (1 for LLaVA, broadcast to the three rows;
3 for Qwen's t, h, w), as base-128 digits in extra channels; the model strips them when it scatters
the embeddings into the prompt and adds the offsets to those tokens' positions in the same step.
(vLLM's own hook for rewriting positions after encoding, ``recompute_mrope_positions``, is only called
by its GPU model runner and only when video pruning is on; the CPU runner never calls it.)
"""

from __future__ import annotations

import torch

DIGIT = 128  # offsets are stored as base-128 digits: exact in bf16/fp16 embeddings (integers <= 256)
CHANNELS = 3  # digits per axis: offsets up to 128**3 - 1


def encode_offsets(embeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``embeds`` (K, H) of one image with each kept token's position offsets from the image start
    ``offsets`` (K, R) (R axes): (K, H + R * CHANNELS), the offsets appended as base-128 digits."""
    offsets = offsets.to(torch.long).cpu()
    if bool((offsets < 0).any()) or bool((offsets >= DIGIT**CHANNELS).any()):
        raise ValueError(f"position offsets must lie in [0, {DIGIT ** CHANNELS}): {offsets.tolist()}")
    digits = torch.stack([(offsets // DIGIT**i) % DIGIT for i in range(CHANNELS)], -1).flatten(1)
    return torch.cat([embeds, digits.to(embeds.device, embeds.dtype)], -1)


def decode_offsets(embeds: torch.Tensor, axes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_offsets` for ``axes`` position axes: (embeddings (K, H), offsets (K, axes))."""
    width = axes * CHANNELS
    digits = embeds[:, -width:].float().round().long().view(-1, axes, CHANNELS)
    scale = torch.tensor([DIGIT**i for i in range(CHANNELS)], device=digits.device)
    return embeds[:, :-width], (digits * scale).sum(-1)


def prompt_positions(length: int, images: list[tuple[int, int, int]], rows: int = 3) -> tuple[torch.Tensor, int]:
    """Positions (rows, length) of a prompt whose images sit at ``(offset, kept, span)``: ``kept``
    placeholders for an image whose unpruned tokens spanned ``span`` positions (LLaVA: its token
    count; Qwen: the largest of its merged grid's t, h, w). Text keeps its unpruned position; the
    placeholders get the image's start position until their offsets are added. Also returns the
    delta vLLM adds to decode steps: the unpruned next position minus ``length``."""
    pos = torch.empty(length, dtype=torch.long)
    p = i = 0
    for offset, kept, span in sorted(images):
        n_text = offset - i
        pos[i:offset] = torch.arange(p, p + n_text)
        p += n_text
        pos[offset : offset + kept] = p
        p += span
        i = offset + kept
    pos[i:] = torch.arange(p, p + length - i)
    p += length - i
    return pos.expand(rows, -1).clone(), p - length
