"""Site 1: between encoder layers. A pre-hook on encoder layer i gathers the tokens a stage keeps
(the class token, if any, always stays first); later layers see the shorter sequence."""

from __future__ import annotations

import torch

from ..adapters.base import grid_layout
from ..errors import SiteError
from .hooks import HookSet
from .masks import gather_cols
from .scoring import cls_attention
from .stage import Context, Stage
from .state import ForwardState, row_meta, take_meta
from .trace import StageRecord, Trace


def _check_equal(sel: torch.Tensor, stage: Stage) -> None:
    if bool((sel < 0).any()):
        raise SiteError(
            f"method stage {stage.name!r}: vision-site selections must keep the same number of tokens "
            "for every image of a batch"
        )


def install_vision(anatomy, stages: list[Stage], state: ForwardState, hooks: HookSet, standalone: bool) -> None:
    """Hook the encoder layers of ``anatomy.vision`` for the vision-site ``stages``."""
    vp = anatomy.vision
    by_layer = {st.layer: st for st in stages}
    rows, cols = vp.grid
    off = int(vp.has_cls)
    n_patch = rows * cols
    meta = row_meta([[grid_layout(rows, cols)]])

    def reset(mod, kw):
        t = kw["hidden_states"].shape[0]
        state.vision_orig = torch.arange(n_patch).expand(t, n_patch)
        state.vision_mask = None
        state.vision_records = []
        if standalone:
            state.trace = Trace(torch.full((t,), n_patch), vp.num_layers, "vision")

    def make_hook(i: int):
        def hook(mod, kw):
            if i == 0:
                reset(mod, kw)
            stage = by_layer.get(i)
            if stage is not None:
                hs = kw["hidden_states"]
                if hs.shape[1] != off + state.vision_orig.shape[1]:
                    raise RuntimeError(
                        f"encoder layer {i} got {hs.shape[1]} tokens, expected {off + state.vision_orig.shape[1]}"
                    )
                orig = state.vision_orig
                attn, norm = vp.attention(mod), vp.input_norm(mod)

                def cls_score() -> torch.Tensor:
                    if not vp.has_cls:
                        raise SiteError(f"method stage {stage.name!r}: this encoder has no CLS token")
                    a = cls_attention(attn, norm(hs), vp.num_heads(attn), vp.scale(attn))
                    return a.mean(1)[:, off:]

                ctx = Context(
                    "vision",
                    i,
                    orig,
                    take_meta({k: v.expand(orig.shape[0], -1) for k, v in meta.items()}, orig),
                    hs[:, off:],
                    scorers={"cls_attention": cls_score},
                )
                sel = stage.select(ctx)
                _check_equal(sel, stage)
                keep_cols = torch.cat([torch.arange(off).expand(sel.shape[0], off), sel + off], 1)
                kw["hidden_states"] = gather_cols(hs, keep_cols)
                state.vision_orig = torch.gather(orig, 1, sel)
                m = kw.get("attention_mask")
                if m is not None and m.dim() == 4:
                    state.vision_mask = gather_cols(gather_cols(m, keep_cols, 2), keep_cols, 3)
                state.vision_records.append((stage.name, i, state.vision_orig))
                if standalone:
                    state.trace.stages.append(StageRecord(stage.name, "vision", i, state.vision_orig))
            if state.vision_mask is not None:
                kw["attention_mask"] = state.vision_mask
            return kw

        return hook

    first = min(by_layer)
    if first < 1 or max(by_layer) >= vp.num_layers:
        raise SiteError(
            f"layer: vision-site stages act before encoder layers 1..{vp.num_layers - 1}; got {sorted(by_layer)}"
        )
    for i, layer in enumerate(vp.layers):
        if i == 0 or i >= first:
            hooks.pre(layer, make_hook(i))
