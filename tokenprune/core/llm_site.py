"""Site 3: before LLM decoder layer K >= 1. In prefill, layer K's pre-hook asks the stage which
visual tokens stay and gathers the hidden states; every layer >= K swaps in the sliced
``position_embeddings``, ``position_ids`` and 4-D mask (the model passes the same objects to all
layers). The KV cache of layers >= K then simply holds fewer entries. On decode steps a
materialised mask is re-indexed to each layer's shorter cache, and with renumbered positions the
new token's RoPE position is shifted. Layer 0 is never pruned: the cache length that generate()
and the mask builder read is layer 0's."""

from __future__ import annotations

import functools

import torch

from ..errors import SiteError
from .hooks import HookSet
from .masks import columns_from_keep, compose, decode_mask, gather_cols, gather_last, prefill_mask
from .scoring import apply_rope, query_logits, split_heads
from .select import pad_rows
from .stage import Context, Stage
from .state import ForwardState, LLMStageState, cache_length, cache_of, take_meta
from .trace import StageRecord


def _visual_columns(visual: torch.Tensor) -> torch.Tensor:
    """(B, N) columns of the visual tokens of each row, -1 padded."""
    return pad_rows([(row >= 0).nonzero().flatten() for row in visual], visual.device)


def _slice_injections(lp, state: ForwardState, hooks: HookSet) -> None:
    """Wrap the language model's per-visual-token additions between layers (``lp.injections``,
    e.g. Qwen3-VL's deepstack: ``fn(hidden_states, visual_mask (B, L), embeds (n, D))``, the mask
    over the LLM input, the embeds in its row-major order) so that after an LLM stage they add to
    the kept visual tokens only."""

    def wrap(owner, name: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def inject(hidden_states, visual_mask, embeds, *args, **kwargs):
            active = state.llm_stages[-1] if state.llm_stages else None
            if active is None or visual_mask is None or active.cols.shape[1] != hidden_states.shape[1]:
                return original(hidden_states, visual_mask, embeds, *args, **kwargs)
            cols = active.cols.to(visual_mask.device)
            row_of = (visual_mask.flatten().long().cumsum(0) - 1).view_as(visual_mask)
            kept = gather_cols(visual_mask, cols, fill=False)
            rows = gather_cols(row_of, cols, fill=0)[kept]
            return original(hidden_states, kept, embeds[rows.to(embeds.device)], *args, **kwargs)

        hooks.setattr(owner, name, inject)

    for owner, name in lp.injections:
        wrap(owner, name)


def install_llm(anatomy, stages: list[Stage], state: ForwardState, hooks: HookSet) -> None:
    """Hook the decoder layers of ``anatomy.llm`` for the LLM-site ``stages``."""
    lp = anatomy.llm
    n_layers = lp.num_layers
    by_layer = {st.layer: st for st in stages}
    if len(by_layer) != len(stages):
        raise SiteError(f"layer: two LLM stages at the same layer {[s.layer for s in stages]}")
    bad = [k for k in by_layer if not 1 <= k < n_layers]
    if bad:
        raise SiteError(f"layer: LLM-site stages act before decoder layers 1..{n_layers - 1}; got {bad}")
    first = min(by_layer)
    renumber = [st.name for st in stages if st.positions == "renumber"]
    if renumber and anatomy.sequence.positions != "1d":
        raise SiteError(
            f"positions: 'renumber' (stages {renumber}) numbers the kept tokens 0..L'-1, which has no meaning for "
            f"{anatomy.name}'s {anatomy.sequence.positions} (3-D) position ids; allowed here: ['keep']"
        )

    def stash(k: int):
        def hook(mod, kw, out):
            if state.llm_input is not None and kw["hidden_states"].shape[1] > 1:
                state.stash[k] = kw
            return None

        return hook

    def run_stage(stage: Stage, layer_mod, kw: dict) -> dict:
        k = stage.layer
        hs = kw["hidden_states"]
        prev = state.active_llm_stage(k - 1)
        inp = state.llm_input
        visual = prev.visual if prev else inp.visual
        real = prev.real if prev else inp.real
        positions = prev.positions if prev else inp.positions
        cand_cols = _visual_columns(visual)
        orig = torch.where(cand_cols >= 0, torch.gather(visual, 1, cand_cols.clamp(min=0)), -1)
        last = torch.full((hs.shape[0], 1), hs.shape[1] - 1, dtype=torch.long, device=hs.device)

        def attention(source: str = "previous", rope: bool = True, normalize: str = "all") -> torch.Tensor:
            # What the model computes anyway is reused: "previous" takes layer K-1's keys (its cache or
            # its captured k_proj output) and the last token's query (its captured q_proj row); "current"
            # projects layer K's keys once and hands them to layer K's own attention, and only the last
            # prompt token's query is projected for it.
            query = None
            if source == "previous":
                saved = state.stash[k - 1]
                attn, hn, mask = lp.attention(lp.layers[k - 1]), saved["hidden_states"], saved.get("attention_mask")
                pe = saved["position_embeddings"]
                query = state.stash.get((k - 1, "query"))
                cache = cache_of(saved)
                keys, rotated = state.stash.get((k - 1, "keys")), False
                keys = None if keys is None else split_heads(keys, attn.head_dim)
                if cache is not None and rope:
                    cached = cache.layers[k - 1].keys
                    if cached is not None and cached.shape[-2] == hn.shape[1]:
                        keys, rotated = cached, True
            elif source == "current":
                attn, hn, mask, pe = (
                    lp.attention(layer_mod),
                    lp.input_norm(layer_mod)(hs),
                    kw.get("attention_mask"),
                    kw["position_embeddings"],
                )
                state.stash[(k, "keys")] = projected = attn.k_proj(hn)
                keys, rotated = split_heads(projected, attn.head_dim), False
            else:
                raise ValueError(f"source: expected 'previous' or 'current', got {source!r}")
            norms = lp.head_norms(attn)
            logits = query_logits(attn, hn, last, pe if rope else None, mask, keys, rotated, norms, query)[:, :, 0]
            if normalize == "all":
                probs = gather_cols(logits.softmax(-1), cand_cols, dim=2)
            elif normalize == "visual":
                sub = gather_cols(logits, cand_cols, dim=2).masked_fill((cand_cols < 0)[:, None], float("-inf"))
                probs = sub.softmax(-1)
            else:
                raise ValueError(f"normalize: expected 'all' or 'visual', got {normalize!r}")
            return probs.mean(1)

        def keys() -> torch.Tensor:  # layer K-1's keys after RoPE, (B, L, H_kv * d)
            saved = state.stash[k - 1]
            attn, hn = lp.attention(lp.layers[k - 1]), saved["hidden_states"]
            cache = cache_of(saved)
            cached = cache.layers[k - 1].keys if cache is not None else None
            if cached is None or cached.shape[-2] != hn.shape[1]:
                projected = state.stash.get((k - 1, "keys"))
                heads = split_heads(attn.k_proj(hn) if projected is None else projected, attn.head_dim)
                k_norm = lp.head_norms(attn)[1]
                heads = heads if k_norm is None else k_norm(heads)
                cached = apply_rope(heads, *saved["position_embeddings"])
            return cached.transpose(1, 2).flatten(2)

        def hidden(norm: str | None = None) -> torch.Tensor:  # layer K-1's output (B, L, D)
            if norm is None:
                return hs
            if norm != "final" or lp.norm is None:
                raise SiteError(f"norm: expected None or 'final' (a model with a final norm); got {norm!r}")
            return lp.norm(hs)

        scorers = {
            "last_token_attention": attention,
            "keys": keys,
            "hidden": hidden,
            "columns": lambda: cand_cols,
            "visual": lambda: visual,
            "sequence": lambda: torch.where(real, real.long().cumsum(-1) - 1, -1),
        }
        ctx = Context("llm", k, orig, take_meta(inp.meta, orig), gather_cols(hs, cand_cols), scorers)
        sel = stage.select(ctx).to(hs.device)
        state.stash.pop(k - 1, None)
        state.stash.pop((k - 1, "keys"), None)
        state.stash.pop((k - 1, "query"), None)
        kept_cols = torch.where(sel >= 0, torch.gather(cand_cols, 1, sel.clamp(min=0)), -1)
        keep = (visual < 0) & (prev.cols >= 0 if prev else torch.ones_like(real))  # text, padding
        rows, slots = (kept_cols >= 0).nonzero(as_tuple=True)
        keep[rows, kept_cols[rows, slots]] = True
        new_cols = columns_from_keep(keep)
        new_real = gather_cols(real, new_cols, fill=False)
        new_visual = gather_cols(visual, new_cols, fill=-1)
        cos, sin = kw["position_embeddings"]
        hidden = gather_cols(hs, new_cols)
        own_keys = state.stash.pop((k, "keys"), None)
        if own_keys is not None:  # layer K's attention takes its kept keys instead of projecting them again
            state.stash[(k, "reuse")] = gather_cols(own_keys, new_cols)
        st = LLMStageState(
            k,
            compose(prev.cols if prev else None, new_cols),
            new_visual,
            new_real,
            None if positions is None else gather_cols(positions, new_cols, fill=1),
        )
        if stage.positions == "renumber":
            new_pos = (new_real.long().cumsum(-1) - 1).clamp(min=0)
            st.position_shift = inp.positions[:, -1:] - new_pos[:, -1:]
            st.kwargs["position_embeddings"] = lp.rotary(hidden, position_ids=new_pos)
            st.kwargs["position_ids"] = new_pos
        else:
            st.kwargs["position_embeddings"] = (gather_cols(cos, new_cols), gather_cols(sin, new_cols))
            pos = kw.get("position_ids")
            st.kwargs["position_ids"] = None if pos is None else gather_last(pos, new_cols, fill=1)
        st.kwargs["attention_mask"] = prefill_mask(kw.get("attention_mask"), new_cols)
        state.llm_stages.append(st)
        kept = pad_rows([row[row >= 0] for row in new_visual], hs.device)
        state.trace.stages.append(StageRecord(stage.name, "llm", k, kept.cpu(), dict(stage.info)))
        kw["hidden_states"] = hidden
        return kw

    def make_hook(j: int):
        def hook(mod, kw):
            if state.llm_input is None:
                return None
            hs = kw["hidden_states"]
            q = hs.shape[1]
            cache = cache_of(kw)
            past = cache_length(cache, j)
            if past == 0 and q > 1:  # prefill
                active = state.active_llm_stage(j - 1)
                if active is not None:
                    kw.update(active.kwargs)
                if j in by_layer:
                    kw = run_stage(by_layer[j], mod, kw)
                    kw.update(state.llm_stages[-1].kwargs)
                return kw
            active = state.active_llm_stage(j)
            if active is None:
                return None
            n_in = state.llm_input.visual.shape[1]
            t = past - active.cols.shape[1]
            kw["attention_mask"] = decode_mask(kw.get("attention_mask"), active.cols, n_in, q, n_in + t + q)
            if active.position_shift is not None:
                pos = kw["position_ids"] - active.position_shift
                kw["position_ids"] = pos
                kw["position_embeddings"] = lp.rotary(hs, position_ids=pos)
            return kw

        return hook

    def skip_projection(k: int):
        def hook(mod, kw):
            name = next(iter(kw))  # the projection's input
            ready = state.stash.pop((k, "reuse"), None)
            if ready is None or ready.shape[:2] != kw[name].shape[:2]:
                return None
            state.stash[(k, "reused")] = ready
            return {**kw, name: kw[name][:, :0]}  # nothing left to project

        return hook

    def reused(k: int):
        def hook(mod, kw, out):
            return state.stash.pop((k, "reused"), None)

        return hook

    def capture(k: int, what: str):  # a projection's output in layer k's prefill: keys, or the last row's query
        def hook(mod, kw, out):
            if state.llm_input is not None and out.shape[1] > 1:
                state.stash[(k, what)] = out if what == "keys" else out[:, -1:].clone()
            return None

        return hook

    for k in by_layer:  # reuse before capture: a captured projection sees the reused keys
        proj = lp.attention(lp.layers[k]).k_proj
        hooks.pre(proj, skip_projection(k))
        hooks.post(proj, reused(k))
    _slice_injections(lp, state, hooks)
    for k in by_layer:
        hooks.post(lp.attention(lp.layers[k - 1]), stash(k - 1))
        hooks.post(lp.attention(lp.layers[k - 1]).k_proj, capture(k - 1, "keys"))
        hooks.post(lp.attention(lp.layers[k - 1]).q_proj, capture(k - 1, "query"))
    for j in range(first, n_layers):
        hooks.pre(lp.layers[j], make_hook(j))
