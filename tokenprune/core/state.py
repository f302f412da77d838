"""Per-forward state shared by the hooks of one patch."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch

from ..adapters.base import ImageLayout
from .stage import META
from .trace import StageRecord, Trace


def cache_of(kw: dict):
    """The KV cache a forward call received, whatever transformers named it: ``cache`` (5.24+; the
    model, layer and attention forwards all take it) or ``past_key_values`` (up to 5.23, and the
    deprecated alias after). Every hook reads the cache through this one accessor."""
    cache = kw.get("cache")
    return cache if cache is not None else kw.get("past_key_values")


def cache_length(cache, layer: int = 0) -> int:
    """Entries in ``cache`` for ``layer`` (0 when there is no cache or the layer holds none yet).
    Layer 0's length is the unpruned one that ``generate()`` and the mask builder read."""
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length(layer))
    except (IndexError, KeyError):
        return 0


def row_meta(per_row: list[list[ImageLayout]]) -> dict[str, torch.Tensor]:
    """Per-sample geometry of every original visual token, images of a sample concatenated:
    dict of (B, N_max) tensors (padding -1), keyed by :data:`~tokenprune.core.stage.META`."""
    rows = []
    for layouts in per_row:
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in META}
        pid = 0
        for i, lay in enumerate(layouts):
            parts["image"].append(torch.full_like(lay.tile, i))
            part = torch.full_like(lay.tile, -1)
            for idx in lay.partitions.values():
                part[idx] = pid
                pid += 1
            parts["partition"].append(part)
            for k in ("tile", "row", "col", "y", "x"):
                parts[k].append(getattr(lay, k))
            parts["frame"].append(lay.frame if lay.frame is not None else torch.zeros_like(lay.tile))
        rows.append({k: torch.cat(v) if v else torch.zeros(0) for k, v in parts.items()})
    width = max((int(r["tile"].numel()) for r in rows), default=0)
    out = {}
    for k in META:
        dtype = torch.float32 if k in ("y", "x") else torch.long
        t = torch.full((len(rows), width), -1, dtype=dtype)
        for b, r in enumerate(rows):
            t[b, : r[k].numel()] = r[k].to(dtype)
        out[k] = t
    return out


def take_meta(meta: dict[str, torch.Tensor], orig: torch.Tensor) -> dict[str, torch.Tensor]:
    """Geometry of the candidates ``orig`` (B, N; -1 padding), on ``orig``'s device."""
    idx = orig.clamp(min=0).cpu()
    return {k: torch.gather(v, 1, idx).masked_fill(idx.ne(orig.cpu()), -1).to(orig.device) for k, v in meta.items()}


@dataclass
class LLMInput:
    """The sequence that entered the language model in this prefill."""

    visual: torch.Tensor  # (B, L) original visual index of each column, -1 for text/padding
    real: torch.Tensor  # (B, L) bool: not padding
    positions: torch.Tensor | None  # (B, L) 1-D position ids the LLM was given (None: M-RoPE)
    meta: dict[str, torch.Tensor]


@dataclass
class LLMStageState:
    """What layers at and after an LLM stage need: the composed column map back to the LLM
    input, and the sliced per-forward arguments every later layer swaps in."""

    layer: int
    cols: torch.Tensor
    visual: torch.Tensor
    real: torch.Tensor
    positions: torch.Tensor
    kwargs: dict = field(default_factory=dict)
    position_shift: torch.Tensor | None = None  # renumbered positions: original - new, (B, 1)


@dataclass
class PromptMap:
    """Pre-LLM compaction of the prompt: ``cols`` (B, L') into the original ``prompt_len``
    columns (-1 = inserted padding), kept for decode-time remapping of generate's 2-D mask."""

    cols: torch.Tensor
    prompt_len: int
    cache: weakref.ref | None = None


_SEQUENCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KV cache -> (state, its prefill's maps)


@dataclass
class ForwardState(threading.local):
    """All per-forward state of one patch; reset at the start of every prefill. Per thread: a
    ``threading.local`` whose fields start fresh in every thread, so concurrent ``generate()``
    calls on one patched model never see each other's state (hooks run in the calling thread)."""

    trace: Trace | None = None
    records: list[StageRecord] = field(default_factory=list)
    vision_orig: torch.Tensor | None = None  # (T, N) original patch index of each encoder token
    vision_size: torch.Tensor | None = None  # (T, N) patches each token averages, after merging
    vision_capture: dict = field(default_factory=dict)  # layer -> normalised attention input
    vision_captures: dict = field(default_factory=dict)  # modality -> its encoder call's capture and inputs
    vision_mask: torch.Tensor | None = None  # attention-mask override for later encoder layers
    vision_records: list[tuple[str, int, torch.Tensor]] = field(default_factory=list)
    encoder_inputs: dict = field(default_factory=dict)  # modality -> arguments generate() encoded it with
    encoded: dict = field(default_factory=dict)  # modality -> features as encoded, before generate() repeats them
    prompt: PromptMap | None = None
    llm_input: LLMInput | None = None
    llm_stages: list[LLMStageState] = field(default_factory=list)
    stash: dict = field(default_factory=dict)
    early_exit: object | None = None  # the early-exit method's per-forward state
    labels: torch.Tensor | None = None  # taken out of a model(..., labels=) call until its loss is computed
    cut_at_compacted: object | None = None  # a cache whose next step generate() cut at its compacted length

    def remember(self, cache) -> None:
        """Tie this prefill's compaction to ``cache``: a later step continuing that cache (a decode
        step, the next chat turn; in any thread, after any other request) resumes it."""
        if cache is not None:
            _SEQUENCES[cache] = (self, self.prompt, self.llm_input, self.llm_stages)

    def resume(self, cache) -> None:
        """Load the compaction tied to ``cache`` by this patch; none for a cache it did not prefill."""
        entry = _SEQUENCES.get(cache) if cache is not None else None
        if entry is None or entry[0] is not self:
            self.prompt, self.llm_input, self.llm_stages = None, None, []
        else:
            _, self.prompt, self.llm_input, self.llm_stages = entry

    def active_llm_stage(self, layer: int) -> LLMStageState | None:
        active = None
        for st in self.llm_stages:
            if st.layer <= layer:
                active = st
        return active
