"""Site 2: between the projector and the LLM. A forward pre-hook on the VLM core (the module that
merges visual features into the text sequence, e.g. ``LlavaModel``, ``Qwen2_5_VLModel``) takes the
features of every image / video of the call (from ``mm_encoder_outputs`` on the ``generate()``
path, or by running the model's own encoder on the forward path), lets the stage choose, and
compacts ``input_ids``, ``attention_mask``, ``position_ids`` and the adapter's other per-token
inputs so the placeholder counts match. Rows that keep different numbers of tokens are re-padded on
the left. Kept tokens keep their ORIGINAL position ids, whatever their rank ((B, L) or M-RoPE's
(3|4, B, L)). On decode steps it remaps ``generate()``'s full-length 2-D mask to the compacted
prompt and, when no position ids are given, continues the positions of the unpruned sequence.

Everything model-specific comes from the adapter's :class:`~tokenprune.adapters.base.Sequence`."""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..adapters.base import ImageLayout, Modality
from ..errors import SiteError, UnsupportedPathError
from .hooks import HookSet
from .masks import columns_from_keep, gather_cols, gather_last
from .scoring import cls_attention, mean_keys, received_attention
from .select import pad_rows
from .stage import Context, Stage
from .state import ForwardState, LLMInput, PromptMap, cache_length, cache_of, row_meta, take_meta
from .trace import StageRecord, Trace


@dataclass
class Item:
    """One image or video of a forward call: its modality, index among that modality's items,
    visual tokens the LLM sees unpruned, sample (row) and first placeholder column."""

    modality: Modality
    index: int
    length: int
    row: int
    start: int
    layout: ImageLayout | None = None


def record_encoder_inputs(anatomy, state: ForwardState, hooks: HookSet) -> None:
    """Wrap each modality's encoder method on the core instance (removed with the patch) to record
    its arguments: ``generate()`` encodes images before prefill and then drops arguments the layouts
    need (``image_sizes``, ``image_grid_thw``), and repeats the features for beams and
    ``num_return_sequences`` (the encoded ones are kept: :func:`_encoded_source`). Calls nested in
    another recorded call (Qwen3-VL's video encoder calls the image one) are not recorded. What the
    call's captured encoder layers saw is kept per modality with those arguments
    (``state.vision_captures``: images and videos go through the tower in separate calls).
    Signatures are preserved (``generate()`` inspects them)."""
    core = anatomy.vlm_core
    busy: list[bool] = []

    def wrap(mod: Modality) -> None:
        original = getattr(core, mod.encoder)
        sig = inspect.signature(original)

        @functools.wraps(original)
        def encoder(*args, **kwargs):
            if busy:
                return original(*args, **kwargs)
            bound = sig.bind_partial(*args, **kwargs).arguments
            inputs = state.encoder_inputs[mod.name] = {**bound.pop("kwargs", {}), **bound}
            busy.append(True)
            try:
                out = original(*args, **kwargs)
            finally:
                busy.pop()
            state.vision_captures[mod.name] = {**state.vision_capture, "inputs": inputs}
            pooled = getattr(out, "pooler_output", None)
            if pooled is not None:
                state.encoded[mod.name] = list(pooled)
            return out

        hooks.setattr(core, mod.encoder, encoder)

    for mod in anatomy.sequence.modalities:
        if getattr(core, mod.encoder, None) is not None:
            wrap(mod)


def track_chat_turns(model, state: ForwardState, hooks: HookSet) -> None:
    """Wrap ``model.generate`` on the instance (removed with the patch) to note a call that continues
    a KV cache, with the whole conversation as ``input_ids``: generate() cuts it at the cache's
    length, which for a cache this patch compacted leaves prompt tokens the cache already holds."""
    original = getattr(model, "generate", None)
    if original is None:
        return

    @functools.wraps(original)
    def generate(*args, **kwargs):
        cache = cache_of(kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        am = kwargs.get("attention_mask")
        whole = ids is not None and (am is None or am.shape[-1] == ids.shape[-1])
        state.cut_at_compacted = cache if whole and cache is not None and cache_length(cache) > 0 else None
        return original(*args, **kwargs)

    hooks.setattr(model, "generate", generate)


def _encoded_source(feats: list[torch.Tensor], encoded: list[torch.Tensor] | None) -> list[int]:
    """For each item's features reaching the LLM, the index of the encoded item it is (``generate()``
    repeats the encoded features per beam / returned sequence: the same tensors, or equal ones);
    the identity when the features are the encoded ones."""
    if not encoded or len(feats) == len(encoded):
        return list(range(len(feats)))
    source = []
    for f in feats:
        j = next((j for j, e in enumerate(encoded) if e is f), None)
        if j is None:
            j = next((j for j, e in enumerate(encoded) if e.shape == f.shape and torch.equal(e, f)), None)
        if j is None:
            raise UnsupportedPathError(
                f"prefill_chunk_size: {len(feats)} feature blocks reach the LLM but {len(encoded)} inputs were "
                "encoded, so they are not whole images (a chunked prefill?); tokenprune prunes whole images: "
                "use prefill_chunk_size=None"
            )
        source.append(j)
    return source


def _regroup(encoded: list[torch.Tensor], placeholders: list[int], per_image: int) -> list[torch.Tensor]:
    """The encoded features in ``generate()``'s repeated order (each prompt's images once per row
    of its beam group) when a vision-site stage shortened them, which transformers' own regrouping
    (it matches feature lengths to placeholder counts) cannot follow. ``placeholders``: per row."""
    images = [n // per_image for n in placeholders]
    k = sum(images) // max(len(encoded), 1)
    if k <= 1:
        return list(encoded)
    out, i = [], 0
    for g in range(0, len(images), k):
        out.extend(encoded[i : i + images[g]] * k)
        i += images[g]
    return out


def _assign(is_tok: torch.Tensor, lengths: list[int], what: str) -> list[list[int]]:
    """Which items (in order) fill each row's placeholders of one modality."""
    per_row, i = [], 0
    for b, count in enumerate(is_tok.sum(-1).tolist()):
        row = []
        while count > 0 and i < len(lengths):
            row.append(i)
            count -= lengths[i]
            i += 1
        if count != 0:
            raise ValueError(f"input_ids row {b}: {what} placeholders do not match the {what} features {lengths}")
        per_row.append(row)
    if i != len(lengths):
        raise ValueError(f"input_ids: {len(lengths)} {what} inputs but placeholders for {i}")
    return per_row


def _present(kw: dict, mod: Modality) -> bool:
    px = kw.get(mod.pixels[0])
    return px is not None and px.numel() > 0


def _encode(seq, kw: dict) -> dict:
    """Encoder outputs per modality name; pixels encoded here are removed from ``kw``."""
    mm = dict(kw.get("mm_encoder_outputs") or {})
    for mod in seq.modalities:
        if mm.get(mod.name) is None and _present(kw, mod):
            mm[mod.name] = mod.encode(kw)
            for name in mod.pixels:
                kw[name] = None
    return mm


def _items(seq, ids: torch.Tensor, lengths: dict[str, list[int]]) -> list[list[Item]]:
    """The items of each row, in sequence order."""
    rows: list[list[Item]] = [[] for _ in range(ids.shape[0])]
    for mod in seq.modalities:
        is_tok = ids == mod.token_id
        for b, idxs in enumerate(_assign(is_tok, lengths.get(mod.name, []), mod.name)):
            cols, off = is_tok[b].nonzero().flatten().tolist(), 0
            for i in idxs:
                rows[b].append(Item(mod, i, lengths[mod.name][i], b, cols[off]))
                off += lengths[mod.name][i]
    return [sorted(r, key=lambda it: it.start) for r in rows]


def _capture_tower(anatomy, stage: Stage | None, state: ForwardState, hooks: HookSet) -> list[int]:
    """Record the inputs (and outputs) of the encoder layers the stage reads scores from."""
    vp = anatomy.vision
    captured = sorted({c % vp.num_layers for c in (stage.capture if stage is not None else ())})
    if captured and vp.tower != "batched" and vp.scorers is None:
        raise SiteError(f"method: {stage.name} reads encoder scores, which this {anatomy.name} tower does not offer")

    def capture(layer: int):
        def hook(mod, kw, out):
            state.vision_capture[layer] = kw["hidden_states"]
            state.vision_capture[("kwargs", layer)] = kw

        return hook

    def capture_output(layer: int):
        def hook(mod, kw, out):
            state.vision_capture[("output", layer)] = out[0] if isinstance(out, tuple) else out

        return hook

    for layer in captured:
        hooks.post(vp.attention(vp.layers[layer]), capture(layer))
        hooks.post(vp.layers[layer], capture_output(layer))
    return captured


def _batched_scorers(
    vp, state: ForwardState, rows: list[list[Item]], source: list[int], cand: torch.Tensor, geometry: dict
) -> dict:
    """Scores read from a batched tower's captured layers, mapped to the candidates: each
    candidate's tower row is its (encoded) image's base or tile crop, its token its patch (+ CLS)."""
    tiles = {source[it.index]: int(it.layout.tile.max()) + 1 for row in rows for it in row}
    if any(it.modality.name != "image" for row in rows for it in row):
        raise SiteError("method: encoder scores are only read for images, not for other visual inputs")
    first_row = torch.tensor([0] + [tiles[j] for j in range(len(tiles))]).cumsum(0)
    gimg = torch.full_like(cand, -1)
    for b, row in enumerate(rows):
        if row:
            local = geometry["image"][b].clamp(min=0)
            gimg[b] = torch.tensor([source[it.index] for it in row])[local]
    patch = (cand >= 0) & (geometry["tile"] >= 0)
    tower_row = torch.where(patch, first_row[gimg.clamp(min=0)] + geometry["tile"], 0)
    token = torch.where(patch, int(vp.has_cls) + geometry["row"] * vp.grid[1] + geometry["col"], 0)

    def hidden(layer: int) -> tuple:
        layer = layer % vp.num_layers
        if layer not in state.vision_capture:
            raise SiteError(f"layer: encoder layer {layer} was not captured; list it in the stage's capture")
        return vp.attention(vp.layers[layer]), state.vision_capture[layer]

    def pick(values: torch.Tensor, fill: float) -> torch.Tensor:
        out = values[tower_row.to(values.device), token.to(values.device)]
        mask = (~patch).to(values.device).view(*patch.shape, *([1] * (out.dim() - 2)))
        return out.masked_fill(mask, fill)

    def cls_score(layer: int, heads: str = "mean") -> torch.Tensor:
        if not vp.has_cls:
            raise SiteError("method: this vision tower has no CLS token")
        attn, h = hidden(layer)
        a = cls_attention(attn, h, vp.num_heads(attn), vp.scale(attn))
        return pick(a.sum(1) if heads == "sum" else a.mean(1), float("-inf"))

    def received(layer: int, heads: str = "mean") -> torch.Tensor:
        attn, h = hidden(layer)
        a = received_attention(attn, h, vp.num_heads(attn), vp.scale(attn))
        return pick(a.sum(1) if heads == "sum" else a.mean(1), float("-inf"))

    def keys(layer: int) -> torch.Tensor:
        attn, h = hidden(layer)
        return pick(mean_keys(attn, h), 0.0)

    def output(layer: int) -> torch.Tensor:
        hidden(layer)  # same capture check
        return pick(state.vision_capture[("output", layer % vp.num_layers)], 0.0)

    return {"cls_attention": cls_score, "received_attention": received, "keys": keys, "hidden": output}


def _text_scorers(core, ids: torch.Tensor, am: torch.Tensor | None, is_vis: torch.Tensor) -> dict:
    """The instruction of each sample (its real text tokens after its last visual token, (B, T) ids,
    -1 padded) and the LLM's input embeddings of token ids."""
    cols = torch.arange(ids.shape[1], device=ids.device)
    last = torch.where(is_vis, cols, -1).amax(-1, keepdim=True)
    after = (cols > last) & (am.bool() if am is not None else True)
    rows = [ids[b][after[b]] for b in range(ids.shape[0])]
    width = max((int(r.numel()) for r in rows), default=0)
    instruction = torch.full((ids.shape[0], width), -1, dtype=torch.long, device=ids.device)
    for b, r in enumerate(rows):
        instruction[b, : r.numel()] = r

    def embed(token_ids: torch.Tensor) -> torch.Tensor:
        return core.get_input_embeddings()(token_ids.clamp(min=0))

    return {"instruction": lambda: instruction, "embed": embed}


def _item_scorers(vp, captures: dict, rows: list[list[Item]], source: dict, cand: torch.Tensor) -> dict:
    """Scores of a packed tower: the adapter's ``vp.scorers(capture)`` gives, per score name, a
    function of the layer returning one tensor per item of that encoder call, token for token as
    the LLM sees them; here they are laid out on the candidates (0 at padding)."""
    by_mod = {m: vp.scorers(cap) for m, cap in captures.items()}
    names = {n for s in by_mod.values() for n in s}

    def make(name: str):
        def score(layer: int, **kwargs) -> torch.Tensor:
            values = {m: s[name](layer % vp.num_layers, **kwargs) for m, s in by_mod.items()}
            out = []
            for b, row in enumerate(rows):
                items = [values[it.modality.name][source[it.modality.name][it.index]] for it in row]
                v = torch.cat(items) if row else None
                c = cand[b].clamp(min=0).to(v.device) if v is not None else None
                out.append(v[c].masked_fill((cand[b] < 0).to(v.device).view(-1, *[1] * (v.dim() - 1)), 0)
                           if v is not None else None)
            ref = next(o for o in out if o is not None)
            return torch.stack([o if o is not None else ref.new_zeros(ref.shape) for o in out])

        return score

    return {n: make(n) for n in names}


def _with_features(out, feats: list[torch.Tensor], aligned: dict[str, list]):
    """A copy of an encoder output with new per-item features (and aligned extras)."""
    new = type(out)(**dict(out.items()))
    new.pooler_output = feats
    for name, value in aligned.items():
        setattr(new, name, value)
    return new


class _Prefill:
    """One prefill through the pre-LLM site: candidates, the stage's choice, the compaction (a
    fresh instance per call: nothing of one call outlives it but what it writes to ``state``)."""

    def __init__(self, anatomy, stage: Stage | None, captured: list[int], state: ForwardState) -> None:
        self.anatomy, self.stage, self.captured, self.state = anatomy, stage, captured, state
        self.seq = anatomy.sequence

    def __call__(self, kw: dict) -> dict:
        anatomy, state, seq = self.anatomy, self.state, self.seq
        ids = kw.get("input_ids")
        if ids is None:
            raise SiteError("input_ids: tokenprune needs input_ids (not inputs_embeds) to find the image tokens")
        am = kw.get("attention_mask")
        if am is not None and bool((am[:, -1] == 0).any()):
            raise UnsupportedPathError(
                "attention_mask: a patched model needs left padding (tokenizer.padding_side = 'left'); "
                f"rows {(am[:, -1] == 0).nonzero().flatten().tolist()} end in padding"
            )
        original_pos = self.original_positions(kw)
        mm = _encode(seq, kw)
        inputs = {**{k: v for e in state.encoder_inputs.values() for k, v in e.items()},
                  **{k: v for k, v in kw.items() if v is not None}}
        encoded, state.encoder_inputs, state.encoded = state.encoded, {}, {}
        feats = {m: list(mm[m].pooler_output) for m in mm if mm[m] is not None}
        cls_off = seq.feature_cls(inputs)
        n_patch = anatomy.vision.grid[0] * anatomy.vision.grid[1]
        enc_images = encoded.get("image", feats.get("image", []))
        self.reduced = bool(
            state.vision_orig is not None and state.vision_records and state.vision_orig.shape[0] == len(enc_images)
        )
        if self.reduced and "image" in feats:
            per_row = (ids == anatomy.image_token_id).sum(-1).tolist()
            feats["image"] = _regroup(enc_images, per_row, n_patch + cls_off)
        self.source = {m: _encoded_source(fs, encoded.get(m)) for m, fs in feats.items()}
        lengths = {m: [f.shape[0] for f in fs] for m, fs in feats.items()}
        if self.reduced:
            lengths["image"] = [n_patch + cls_off] * len(feats["image"])
        rows = _items(seq, ids, lengths)
        for mod in seq.modalities:
            if lengths.get(mod.name):
                src = self.source[mod.name]
                first = {j: i for i, j in reversed(list(enumerate(src)))}  # an item of each encoded input
                layouts = mod.layouts([lengths[mod.name][first[j]] for j in range(len(first))], inputs)
                for it in (it for row in rows for it in row if it.modality is mod):
                    it.layout = layouts[src[it.index]]
        self.cls_off, self.am = cls_off, am
        kept, new_row_feats, trace = self.choose(ids, rows, feats)
        return self.compact(kw, ids, am, rows, mm, feats, kept, new_row_feats, trace, original_pos)

    def original_positions(self, kw: dict) -> torch.Tensor | None:
        """The position ids the model would use for the unpruned prompt (None: 1-D defaults)."""
        if kw.get("position_ids") is not None:
            return kw["position_ids"]
        if self.seq.original_positions is not None:
            return self.seq.original_positions(kw)
        return None

    def available(self, it: Item, orig: torch.Tensor | None = None) -> torch.Tensor:
        """Original visual indices (within the item) still present after the encoder (after the
        vision-site stage that left ``orig``, by default the last one)."""
        if not (self.reduced and it.modality.name == "image"):
            return torch.arange(it.length)
        orig = self.state.vision_orig if orig is None else orig
        return torch.cat([torch.arange(self.cls_off), orig[self.source["image"][it.index]].cpu() + self.cls_off])

    def per_row(self, rows: list[list[Item]], fn) -> torch.Tensor:
        out = []
        for row in rows:
            offs = [sum(it.length for it in row[:k]) for k in range(len(row))]
            out.append(torch.cat([fn(it) + o for it, o in zip(row, offs)]) if row else torch.zeros(0, dtype=torch.long))
        return pad_rows(out)

    def choose(self, ids: torch.Tensor, rows: list[list[Item]], feats: dict):
        """Candidates, the stage's selection and the trace: kept original visual indices per row
        (B, K) and the features (B, K, D) of the kept slots."""
        state, stage = self.state, self.stage
        is_vis = self.is_visual(ids)
        trace = Trace(is_vis.sum(-1).cpu(), self.anatomy.llm.num_layers, "llm")
        for name, layer, orig in state.vision_records if self.reduced else []:
            trace.stages.append(
                StageRecord(name, "vision", layer, self.per_row(rows, lambda it, o=orig: self.available(it, o)))
            )
        cand = self.per_row(rows, self.available)  # (B, N) original indices of tokens that reached the projector
        any_feat = next((f for fs in feats.values() for f in fs), None)
        dim = any_feat.shape[-1] if any_feat is not None else 0
        row_feats = torch.zeros(ids.shape[0], cand.shape[1], dim,
                                dtype=any_feat.dtype if any_feat is not None else None, device=ids.device)
        for b, row in enumerate(rows):
            if row:
                f = torch.cat([feats[it.modality.name][it.index] for it in row])
                row_feats[b, : f.shape[0]] = f
        self.meta = row_meta([[it.layout for it in row] for row in rows])
        trace.meta = self.meta
        if stage is None:
            return cand, row_feats, trace
        geometry = take_meta(self.meta, cand)
        scorers = _text_scorers(self.anatomy.vlm_core, ids, self.am, is_vis)
        if self.captured:
            scorers.update(self.scorers(rows, cand, geometry))
        projector = getattr(self.anatomy.vlm_core, "multi_modal_projector", None)
        ctx = Context("pre_llm", -1, cand, geometry, row_feats, scorers, project=projector)
        sel = stage.select(ctx)
        sel, new_row_feats = sel if isinstance(sel, tuple) else (sel, gather_cols(row_feats, sel.to(ids.device)))
        kept = torch.where(sel >= 0, torch.gather(cand, 1, sel.clamp(min=0).cpu()), -1)
        trace.stages.append(StageRecord(stage.name, "pre_llm", -1, kept, dict(stage.info)))
        return kept, new_row_feats, trace

    def scorers(self, rows: list[list[Item]], cand: torch.Tensor, geometry: dict) -> dict:
        vp = self.anatomy.vision
        if vp.tower == "batched":
            return _batched_scorers(vp, self.state, rows, self.source.get("image", []), cand, geometry)
        return _item_scorers(vp, self.state.vision_captures, rows, self.source, cand)

    def is_visual(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(ids, dtype=torch.bool)
        for mod in self.seq.modalities:
            out |= ids == mod.token_id
        return out

    def split_features(self, rows, mm, kept, new_row_feats) -> dict:
        """The encoder outputs with each item's kept features (and its aligned extras)."""
        per_mod: dict[str, list] = {m: [None] * len(self.source[m]) for m, o in mm.items() if o is not None}
        aligned: dict[str, dict[str, list]] = {}
        for b, row in enumerate(rows):
            k = kept[b][kept[b] >= 0]
            f = new_row_feats[b, : k.numel()]
            start = 0
            for it in row:
                local = k[(k >= start) & (k < start + it.length)] - start
                per_mod[it.modality.name][it.index] = f[: local.numel()]
                f = f[local.numel():]
                start += it.length
                for name in it.modality.aligned:
                    per_layer = getattr(mm[it.modality.name], name)
                    slot = aligned.setdefault(it.modality.name, {}).setdefault(
                        name, [[None] * len(per_mod[it.modality.name]) for _ in per_layer])
                    for j, layer_feats in enumerate(per_layer):
                        slot[j][it.index] = layer_feats[it.index][local.to(layer_feats[it.index].device)]
        pack = {mod.name: mod.pack for mod in self.seq.modalities}
        return {m: _with_features(mm[m], pack[m](per_mod[m]), aligned.get(m, {})) for m in per_mod}

    def compact(self, kw, ids, am, rows, mm, feats, kept, new_row_feats, trace, original_pos) -> dict:
        """Text columns stay, visual columns stay when their original index is kept."""
        state, seq = self.state, self.seq
        b_size, length = ids.shape
        is_vis = self.is_visual(ids)
        visual = torch.where(is_vis, is_vis.cumsum(-1) - 1, -1)
        table = torch.zeros(b_size, max(1, int(is_vis.sum(-1).max())), dtype=torch.bool)
        for b in range(b_size):
            table[b, kept[b][kept[b] >= 0]] = True
        keep = ~is_vis | (is_vis & torch.gather(table.to(ids.device), 1, visual.clamp(min=0)))
        cols = columns_from_keep(keep)
        fillers = bool((cols < 0).any())
        identity = not fillers and cols.shape[1] == length
        kw["input_ids"] = gather_cols(ids, cols, fill=self.anatomy.pad_token_id)
        for name in seq.per_token:
            if kw.get(name) is not None:
                kw[name] = gather_cols(kw[name], cols, fill=0)
        if am is not None or not identity:  # explicit: without a mask, gaps in position ids read as packed sequences
            base = am if am is not None else torch.ones_like(ids)
            kw["attention_mask"] = gather_cols(base, cols, fill=0)
        if not identity:
            pos = original_pos if original_pos is not None else torch.arange(length, device=ids.device)[None]
            kw["position_ids"] = gather_last(pos, cols, fill=1)
        new_pos = kw.get("position_ids")
        if seq.positions == "1d":
            new_pos = (new_pos if new_pos is not None else torch.arange(length, device=ids.device)[None])
            new_pos = new_pos.expand(b_size, -1)
        else:
            new_pos = None
        kw["mm_encoder_outputs"] = self.split_features(rows, mm, kept, new_row_feats)
        cache = cache_of(kw)
        use_cache = kw.get("use_cache") if kw.get("use_cache") is not None else self.anatomy.llm.config.use_cache
        if cache is None and use_cache:
            cache = DynamicCache(config=self.anatomy.llm.config)  # what the LLM would create; ours to remember
            names = inspect.signature(self.anatomy.vlm_core.forward).parameters
            kw["cache" if "cache" in names else "past_key_values"] = cache
        state.prompt = None if identity else PromptMap(cols, length, weakref.ref(cache) if cache is not None else None)
        real = (
            kw["attention_mask"].bool()
            if kw.get("attention_mask") is not None
            else torch.ones_like(cols, dtype=torch.bool)
        )
        state.llm_input = LLMInput(gather_cols(visual, cols, fill=-1), real, new_pos, self.meta)
        state.llm_stages = []
        state.trace = trace
        state.remember(cache)
        return kw


def _decode(anatomy, state: ForwardState, kw: dict) -> dict | None:
    """Re-index ``generate()``'s full-length 2-D mask to the compacted prompt; without position
    ids, give the new tokens those of the unpruned sequence's continuation."""
    pm = state.prompt
    if pm is None:
        return None
    cache = cache_of(kw)
    past = cache_length(cache)
    new_len = pm.cols.shape[1]
    ids = kw.get("input_ids")
    ref = kw.get("inputs_embeds") if ids is None else ids
    q = ref.shape[1]
    t = past - new_len
    if t < 0:
        return None
    full = pm.prompt_len + t + q
    am = kw.get("attention_mask")
    dropped = pm.prompt_len - new_len
    cut = state.cut_at_compacted is cache or (am is not None and am.shape[-1] == past + q != full)
    state.cut_at_compacted = None
    if cut and q > dropped:
        # a new chat turn from this cache: generate() cut the whole conversation at the compacted
        # cache length, so the first `dropped` columns are prompt tokens the cache already holds
        full -= dropped
        for name in ("input_ids", "inputs_embeds", "position_ids", *anatomy.sequence.per_token):
            if kw.get(name) is not None:
                kw[name] = kw[name][:, dropped:] if name == "inputs_embeds" else kw[name][..., dropped:]
        ref = ref[:, dropped:]
        q -= dropped
    if am is None and bool((pm.cols < 0).any()):
        am = torch.ones(pm.cols.shape[0], full, dtype=torch.long, device=ref.device)
    if am is not None:
        if am.shape[-1] != full:
            return None  # not the sequence this prompt map belongs to
        head = gather_cols(am[:, : pm.prompt_len], pm.cols, fill=0)
        kw["attention_mask"] = torch.cat([head, am[:, pm.prompt_len :]], dim=-1)
    if kw.get("position_ids") is None:
        past_full = past + pm.prompt_len - new_len
        seq = anatomy.sequence
        if seq.continuation is not None:
            kw["position_ids"] = seq.continuation(past_full, q, ref.shape[0], ref.device)
        else:
            kw["position_ids"] = (torch.arange(q, device=ref.device) + past_full)[None]
    return kw


def install_pre_llm(anatomy, stage: Stage | None, state: ForwardState, hooks: HookSet) -> None:
    """Hook ``anatomy.vlm_core`` so every prefill is traced and, with a stage, reduced."""
    seq = anatomy.sequence
    record_encoder_inputs(anatomy, state, hooks)
    track_chat_turns(anatomy.model, state, hooks)
    captured = _capture_tower(anatomy, stage, state, hooks)

    def hook(mod, kw: dict):
        mm = kw.get("mm_encoder_outputs") or {}
        has_visual = any(mm.get(m.name) is not None or _present(kw, m) for m in seq.modalities)
        cache = cache_of(kw)
        if cache_length(cache) == 0:
            if not has_visual:
                state.prompt, state.llm_input, state.llm_stages, state.trace = None, None, [], None
                return None
            return _Prefill(anatomy, stage, captured, state)(kw)
        if has_visual:
            raise UnsupportedPathError(
                "past_key_values: images in a step that continues a KV cache (a chunked prefill, or a new image in "
                "a continued chat) are not pruned by tokenprune; prefill every image in one call: generate() from "
                "the full conversation without past_key_values, and prefill_chunk_size=None"
            )
        state.resume(cache)
        return _decode(anatomy, state, kw)

    hooks.pre(anatomy.vlm_core, hook)
