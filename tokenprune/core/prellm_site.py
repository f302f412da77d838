"""Site 2: between the projector and the LLM. A forward pre-hook on the LLaVA model (``LlavaModel``
/ ``LlavaNextModel``) takes the image features (from ``mm_encoder_outputs`` on the ``generate()``
path, or by encoding ``pixel_values`` itself on the ``forward()`` path), lets the stage choose,
and compacts ``input_ids``, ``attention_mask`` and ``position_ids`` so the ``<image>`` count
matches. Rows that keep different numbers of tokens are re-padded on the left. On decode steps it
remaps ``generate()``'s full-length 2-D mask to the compacted prompt."""

from __future__ import annotations

import functools
import inspect
import weakref

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import SiteError
from .hooks import HookSet
from .masks import columns_from_keep, gather_cols
from .scoring import cls_attention, mean_keys
from .select import pad_rows
from .stage import Context, Stage
from .state import ForwardState, LLMInput, PromptMap, cache_length, row_meta, take_meta
from .trace import StageRecord, Trace


def record_image_sizes(core, state: ForwardState, hooks: HookSet) -> None:
    """Wrap ``core.get_image_features`` on the instance (removed with the patch) to record
    ``image_sizes``: ``generate()`` encodes images before prefill and pops the sizes, which the
    LLaVA-NeXT layout needs. The signature is preserved (``generate()`` inspects it)."""
    original = core.get_image_features
    sig = inspect.signature(original)

    @functools.wraps(original)
    def get_image_features(*args, **kwargs):
        bound = sig.bind_partial(*args, **kwargs).arguments
        state.image_sizes = bound.get("image_sizes", bound.get("kwargs", {}).get("image_sizes"))
        return original(*args, **kwargs)

    hooks.setattr(core, "get_image_features", get_image_features)


def _assign_images(is_img: torch.Tensor, lengths: list[int]) -> list[list[int]]:
    """Which images (in order) fill each row's ``<image>`` placeholders."""
    per_row, i = [], 0
    for b, count in enumerate(is_img.sum(-1).tolist()):
        row = []
        while count > 0 and i < len(lengths):
            row.append(i)
            count -= lengths[i]
            i += 1
        if count != 0:
            raise ValueError(f"input_ids row {b}: <image> placeholders do not match the image features {lengths}")
        per_row.append(row)
    if i != len(lengths):
        raise ValueError(f"input_ids: {len(lengths)} images but placeholders for {i}")
    return per_row


def install_pre_llm(anatomy, stage: Stage | None, state: ForwardState, hooks: HookSet) -> None:
    """Hook ``anatomy.vlm_core`` so every prefill is traced and, with a stage, reduced."""
    core = anatomy.vlm_core
    vp = anatomy.vision
    image_token = anatomy.image_token_id
    record_image_sizes(core, state, hooks)
    captured = sorted({c % vp.num_layers for c in (stage.capture if stage is not None else ())})
    projector = getattr(core, "multi_modal_projector", None)

    def capture(layer: int):
        def hook(mod, kw, out):
            state.vision_capture[layer] = kw["hidden_states"]

        return hook

    def capture_output(layer: int):
        def hook(mod, kw, out):
            state.vision_capture[("output", layer)] = out[0] if isinstance(out, tuple) else out

        return hook

    for layer in captured:
        hooks.post(vp.attention(vp.layers[layer]), capture(layer))
        hooks.post(vp.layers[layer], capture_output(layer))

    def tower_scorers(rows: list[list[int]], layouts, cand: torch.Tensor, geometry: dict) -> dict:
        """Scores read from the encoder's captured layers, mapped to the candidates: each
        candidate's tower row is its image's base or tile crop, its token its patch (+ CLS)."""
        first_row = torch.tensor([0] + [int(lay.tile.max()) + 1 for lay in layouts]).cumsum(0)
        gimg = torch.full_like(cand, -1)
        for b, imgs in enumerate(rows):
            if imgs:
                local = geometry["image"][b].clamp(min=0)
                gimg[b] = torch.tensor(imgs)[local]
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

        def keys(layer: int) -> torch.Tensor:
            attn, h = hidden(layer)
            return pick(mean_keys(attn, h), 0.0)

        def output(layer: int) -> torch.Tensor:
            hidden(layer)  # same capture check
            return pick(state.vision_capture[("output", layer % vp.num_layers)], 0.0)

        return {"cls_attention": cls_score, "keys": keys, "hidden": output}

    def encode(kw: dict):
        mm = dict(kw.get("mm_encoder_outputs") or {})
        if mm.get("image") is None:
            extra = {"image_sizes": kw["image_sizes"]} if kw.get("image_sizes") is not None else {}
            mm["image"] = core.get_image_features(
                pixel_values=kw["pixel_values"],
                vision_feature_layer=kw.get("vision_feature_layer"),
                vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
                return_dict=True,
                **extra,
            )
            kw["pixel_values"] = None
        return mm

    def prefill(kw: dict) -> dict:
        ids = kw.get("input_ids")
        if ids is None:
            raise SiteError("input_ids: tokenprune needs input_ids (not inputs_embeds) to find the image tokens")
        am = kw.get("attention_mask")
        if am is not None and bool((am[:, -1] == 0).any()):
            raise ValueError("attention_mask: tokenprune needs left padding (tokenizer.padding_side = 'left')")
        mm = encode(kw)
        feats = list(mm["image"].pooler_output)
        strategy = kw.get("vision_feature_select_strategy") or core.config.vision_feature_select_strategy
        cls_off = int(vp.has_cls and strategy == "full")
        reduced = state.vision_orig is not None and state.vision_records and state.vision_orig.shape[0] == len(feats)
        n_patch = vp.grid[0] * vp.grid[1]
        lengths = [n_patch + cls_off if reduced else f.shape[0] for f in feats]
        layouts = anatomy.layouts(
            lengths, state.image_sizes if state.image_sizes is not None else kw.get("image_sizes")
        )
        b_size, seq = ids.shape
        is_img = ids == image_token
        rows = _assign_images(is_img, lengths)

        def available(i: int, orig: torch.Tensor | None = None) -> torch.Tensor:
            """Original visual indices (within image i) still present after the encoder."""
            if not reduced:
                return torch.arange(lengths[i])
            orig = state.vision_orig[i] if orig is None else orig
            return torch.cat([torch.arange(cls_off), orig.cpu() + cls_off])

        def per_row(fn) -> torch.Tensor:
            out = []
            for imgs in rows:
                offs = [sum(lengths[j] for j in imgs[:k]) for k in range(len(imgs))]
                out.append(
                    torch.cat([fn(i) + o for i, o in zip(imgs, offs)]) if imgs else torch.zeros(0, dtype=torch.long)
                )
            return pad_rows(out)

        trace = Trace(is_img.sum(-1).cpu(), anatomy.llm.num_layers, "llm")
        for name, layer, orig in state.vision_records if reduced else []:
            trace.stages.append(StageRecord(name, "vision", layer, per_row(lambda i, o=orig: available(i, o[i]))))
        cand = per_row(available)  # (B, N) original indices of tokens that reached the projector
        dim = feats[0].shape[-1] if feats else 0
        row_feats = torch.zeros(b_size, cand.shape[1], dim, dtype=feats[0].dtype if feats else None, device=ids.device)
        for b, imgs in enumerate(rows):
            if imgs:
                f = torch.cat([feats[i] for i in imgs])
                row_feats[b, : f.shape[0]] = f
        meta = row_meta([[layouts[i] for i in imgs] for imgs in rows])
        kept, new_row_feats = cand, row_feats
        if stage is not None:
            geometry = take_meta(meta, cand)
            scorers = tower_scorers(rows, layouts, cand, geometry) if captured else {}
            ctx = Context("pre_llm", -1, cand, geometry, row_feats, scorers, project=projector)
            sel = stage.select(ctx)
            sel, new_row_feats = sel if isinstance(sel, tuple) else (sel, gather_cols(row_feats, sel.to(ids.device)))
            kept = torch.where(sel >= 0, torch.gather(cand, 1, sel.clamp(min=0).cpu()), -1)
            trace.stages.append(StageRecord(stage.name, "pre_llm", -1, kept))
        # compaction: text columns stay, visual columns stay when their original index is kept
        visual = torch.where(is_img, is_img.cumsum(-1) - 1, -1)
        table = torch.zeros(b_size, max(1, int(is_img.sum(-1).max())), dtype=torch.bool)
        for b in range(b_size):
            table[b, kept[b][kept[b] >= 0]] = True
        keep = ~is_img | (is_img & torch.gather(table.to(ids.device), 1, visual.clamp(min=0)))
        cols = columns_from_keep(keep)
        new_feats = []
        for b, imgs in enumerate(rows):
            k_b = int((kept[b] >= 0).sum())
            f = new_row_feats[b, :k_b]
            img_of = torch.tensor([j for j, i in enumerate(imgs) for _ in range(lengths[i])], dtype=torch.long)
            counts = torch.bincount(img_of[kept[b][kept[b] >= 0]], minlength=len(imgs)).tolist() if imgs else []
            new_feats.extend(f.split(counts))
        fillers = bool((cols < 0).any())
        identity = not fillers and cols.shape[1] == seq
        kw["input_ids"] = gather_cols(ids, cols, fill=anatomy.pad_token_id)
        if am is not None or fillers:
            base = am if am is not None else torch.ones_like(ids)
            kw["attention_mask"] = gather_cols(base, cols, fill=0)
        pos = kw.get("position_ids")
        base_pos = pos if pos is not None else torch.arange(seq, device=ids.device)[None]
        new_pos = gather_cols(base_pos, cols, fill=1)
        if pos is not None or not identity:
            kw["position_ids"] = new_pos
        kw["mm_encoder_outputs"] = {**mm, "image": BaseModelOutputWithPooling(pooler_output=new_feats)}
        cache = kw.get("past_key_values")
        state.prompt = None if identity else PromptMap(cols, seq, weakref.ref(cache) if cache is not None else None)
        real = (
            kw["attention_mask"].bool()
            if kw.get("attention_mask") is not None
            else torch.ones_like(cols, dtype=torch.bool)
        )
        state.llm_input = LLMInput(gather_cols(visual, cols, fill=-1), real, new_pos.expand(b_size, -1), meta)
        state.llm_stages = []
        state.trace = trace
        return kw

    def decode(kw: dict) -> dict | None:
        pm = state.prompt
        if pm is None:
            return None
        cache = kw.get("past_key_values")
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
        if am is None and bool((pm.cols < 0).any()):
            am = torch.ones(pm.cols.shape[0], full, dtype=torch.long, device=ref.device)
        if am is not None:
            if am.shape[-1] != full:
                return None  # not the sequence this prompt map belongs to
            head = gather_cols(am[:, : pm.prompt_len], pm.cols, fill=0)
            kw["attention_mask"] = torch.cat([head, am[:, pm.prompt_len :]], dim=-1)
        if kw.get("position_ids") is None:
            kw["position_ids"] = (torch.arange(q, device=ref.device) + past + pm.prompt_len - new_len)[None]
        return kw

    def hook(mod, kw: dict):
        mm = kw.get("mm_encoder_outputs") or {}
        pv = kw.get("pixel_values")
        has_images = mm.get("image") is not None or (pv is not None and pv.numel() > 0)
        if cache_length(kw.get("past_key_values")) == 0:
            if not has_images:
                state.prompt, state.llm_input, state.llm_stages = None, None, []
                return None
            return prefill(kw)
        return decode(kw)

    hooks.pre(core, hook)
