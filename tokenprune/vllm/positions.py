"""Original RoPE positions for a shortened prompt, through vLLM's M-RoPE position path.

tokenprune's Hugging Face path keeps every surviving token at its ORIGINAL position (the kept image
tokens at ``image_start + original index``, the text after an image where it was, decoding from the
unpruned length on). vLLM numbers a prompt contiguously, except for M-RoPE models, whose per-token
positions a model computes itself (``get_mrope_input_positions``) when a request arrives, before the
encoder runs. For a 1-D RoPE model the three M-RoPE rows are equal, which is exactly 1-D RoPE.

Before encoding only the counts are known: text positions are final, an image's K placeholders get
``start + rank`` (rank 0..K-1). After encoding, each kept embedding row carries ``index - rank``
(its shift) in extra channels; the model strips them when it scatters the embeddings into the
prompt and adds the shifts to those tokens' positions in the same step. (vLLM's own hook for
rewriting positions after encoding, ``recompute_mrope_positions``, is only called by its GPU
model runner and only when video pruning is on; the CPU runner never calls it.)
"""

from __future__ import annotations

import torch

DIGIT = 128  # shifts are stored as base-128 digits: exact in bf16/fp16 embeddings (integers <= 256)
CHANNELS = 3  # shifts up to 128**3 - 1 per image


def encode_shifts(embeds: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``embeds`` (K, H) of one image with its kept original indices ``kept`` (K,), ascending:
    (K, H + CHANNELS), the shift ``kept - rank`` appended as base-128 digits."""
    kept = kept.to(torch.long).cpu()
    shift = kept - torch.arange(kept.numel())
    if bool((kept[1:] <= kept[:-1]).any()) or bool((shift < 0).any()) or bool((shift >= DIGIT**CHANNELS).any()):
        raise ValueError(f"kept indices must be ascending and below {DIGIT ** CHANNELS}: {kept.tolist()}")
    digits = torch.stack([(shift // DIGIT**i) % DIGIT for i in range(CHANNELS)], -1)
    return torch.cat([embeds, digits.to(embeds.device, embeds.dtype)], -1)


def decode_shifts(embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_shifts`: (embeddings (K, H), shifts (K,))."""
    digits = embeds[:, -CHANNELS:].float().round().long()
    scale = torch.tensor([DIGIT**i for i in range(CHANNELS)], device=digits.device)
    return embeds[:, :-CHANNELS], (digits * scale).sum(-1)


def prompt_positions(length: int, images: list[tuple[int, int, int]], rows: int = 3) -> tuple[torch.Tensor, int]:
    """Positions (rows, length) of a prompt whose images sit at ``(offset, kept, full)``: ``kept``
    placeholders standing for ``full`` original tokens. Text keeps its unpruned position; the
    placeholders get ``start + rank`` until :func:`apply_shifts`. Also returns the delta vLLM adds to
    decode steps: the unpruned prompt length minus ``length``."""
    pos = torch.empty(length, dtype=torch.long)
    p = i = 0
    for offset, kept, full in sorted(images):
        n_text = offset - i
        pos[i:offset] = torch.arange(p, p + n_text)
        p += n_text
        pos[offset : offset + kept] = torch.arange(p, p + kept)
        p += full
        i = offset + kept
    pos[i:] = torch.arange(p, p + length - i)
    p += length - i
    return pos.expand(rows, -1).clone(), p - length
