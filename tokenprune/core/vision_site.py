"""Site 1: between encoder layers. A pre-hook on encoder layer i replaces the patch tokens by
those a stage keeps, or by the merged / rebuilt tokens it returns (the class token, if any, always
stays first); later layers see the new sequence. Merged tokens carry a size, and their log size is
added to every later layer's attention logits (ToMe's proportional attention) through the
layer's attention-mask argument."""

from __future__ import annotations

import torch

from ..adapters.base import grid_layout
from ..errors import SiteError
from .hooks import HookSet
from .masks import gather_cols
from .merge import weighted_average
from .scoring import cls_attention, mean_keys
from .stage import Context, Reduction, Stage
from .state import ForwardState, row_meta, take_meta
from .trace import StageRecord, Trace


def _as_reduction(sel, patches: torch.Tensor, orig: torch.Tensor, size: torch.Tensor | None, stage: Stage):
    """A drop (positions) as a :class:`Reduction`."""
    if isinstance(sel, Reduction):
        return sel
    if bool((sel < 0).any()):
        raise SiteError(
            f"method stage {stage.name!r}: vision-site selections must keep the same number of tokens "
            "for every image of a batch"
        )
    sel = sel.to(patches.device)
    return Reduction(
        gather_cols(patches, sel), torch.gather(orig, 1, sel), None if size is None else torch.gather(size, 1, sel)
    )


def install_vision(anatomy, stages: list[Stage], state: ForwardState, hooks: HookSet, standalone: bool) -> None:
    """Hook the encoder layers of ``anatomy.vision`` for the vision-site ``stages``."""
    vp = anatomy.vision
    by_layer = {st.layer: st for st in stages}
    first = min(by_layer)
    if first < 1 or max(by_layer) >= vp.num_layers:
        raise SiteError(
            f"layer: vision-site stages act before encoder layers 1..{vp.num_layers - 1}; got {sorted(by_layer)}"
        )
    rows, cols = vp.grid
    off = int(vp.has_cls)
    n_patch = rows * cols
    meta = row_meta([[grid_layout(rows, cols)]])
    stash: dict[int, torch.Tensor] = {}
    pending: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # mid-layer merges: (assign, old size)
    mid = [st for st in stages if st.placement == "mid"]
    if any(st.placement not in ("input", "mid") for st in stages):
        raise SiteError(f"placement: expected 'input' or 'mid'; got {[st.placement for st in stages]}")
    if mid and (vp.mlp_norm is None or vp.mlp is None):
        raise SiteError(f"placement: 'mid' needs the encoder layers' MLP and its norm; {anatomy.name} has none")

    def reset(hs: torch.Tensor) -> None:
        t = hs.shape[0]
        state.vision_orig = torch.arange(n_patch, device=hs.device).expand(t, n_patch)
        state.vision_size = None
        state.vision_mask = None
        state.vision_records = []
        if standalone:
            state.trace = Trace(torch.full((t,), n_patch), vp.num_layers, "vision")

    def run_stage(stage: Stage, layer, hs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        i = stage.layer
        if hs.shape[1] != off + state.vision_orig.shape[1]:
            raise RuntimeError(
                f"encoder layer {i} got {hs.shape[1]} tokens, expected {off + state.vision_orig.shape[1]}"
            )
        orig, size = state.vision_orig, state.vision_size
        attn, norm = vp.attention(layer), vp.input_norm(layer)

        def cls_score(heads: str = "mean") -> torch.Tensor:
            if not vp.has_cls:
                raise SiteError(f"method stage {stage.name!r}: this encoder has no CLS token")
            a = cls_attention(attn, norm(hs), vp.num_heads(attn), vp.scale(attn))[..., off:]
            return a.sum(1) if heads == "sum" else a.mean(1)

        def keys(source: str = "previous") -> torch.Tensor:
            if source == "previous":
                return mean_keys(vp.attention(vp.layers[i - 1]), stash[i - 1])[:, off:]
            return mean_keys(attn, norm(hs))[:, off:]

        t = orig.shape[0]
        geometry = take_meta({k: v.expand(t, -1) for k, v in meta.items()}, orig)
        patches = hs[:, off:]
        ctx = Context("vision", i, orig, geometry, patches, {"cls_attention": cls_score, "keys": keys}, size)
        red = _as_reduction(stage.select(ctx), patches, orig, size, stage)
        if stage.placement == "mid":
            if red.assign is None:
                raise SiteError(f"method stage {stage.name!r}: placement 'mid' needs a Reduction with assign")
            pending[i] = (red.assign, size)
        state.vision_orig, state.vision_size = red.orig, red.size
        new = torch.cat([hs[:, :off], red.tokens.to(hs.dtype)], 1)
        if red.size is not None and bool((red.size != 1).any()):  # proportional attention: + log(size)
            sizes = torch.cat([torch.ones(t, off, dtype=red.size.dtype, device=hs.device), red.size], 1)
            state.vision_mask = sizes.log().to(hs.dtype)[:, None, None, :]
        elif mask is not None and mask.dim() == 4:
            raise SiteError(f"method stage {stage.name!r}: encoders called with an attention mask are not supported")
        else:
            state.vision_mask = None
        state.vision_records.append((stage.name, i, state.vision_orig))
        if standalone:
            state.trace.stages.append(StageRecord(stage.name, "vision", i, state.vision_orig.cpu()))
        return new

    def make_hook(i: int):
        def hook(mod, kw):
            if i == 0:
                reset(kw["hidden_states"])
            stage = by_layer.get(i)
            if stage is not None and stage.placement == "mid":  # finish the merge made inside layer i - 1
                hs = kw["hidden_states"]
                assign, size = pending.pop(i)
                tokens = weighted_average(hs[:, off:], size, assign, state.vision_orig.shape[1])[0]
                kw["hidden_states"] = torch.cat([hs[:, :off], tokens], 1)
            elif stage is not None:
                kw["hidden_states"] = run_stage(stage, mod, kw["hidden_states"], kw.get("attention_mask"))
            if state.vision_mask is not None:
                kw["attention_mask"] = state.vision_mask
            return kw

        return hook

    def keep_input(i: int):
        def hook(mod, kw, out):
            stash[i] = kw["hidden_states"]

        return hook

    def merge_mlp_input(i: int):  # pre-hook on the MLP norm of layer i - 1: merge the residual stream
        def hook(mod, kw):
            name = next(iter(kw))
            kw[name] = run_stage(by_layer[i], vp.layers[i], kw[name], None)
            return kw

        return hook

    def copy_mlp_output(i: int):  # post-hook on the MLP of layer i - 1: every member token gets its slot's output
        def hook(mod, kw, out):
            return torch.cat([out[:, :off], gather_cols(out[:, off:], pending[i][0])], 1)

        return hook

    for i, layer in enumerate(vp.layers):
        if i == 0 or i >= first:
            hooks.pre(layer, make_hook(i))
        if i + 1 in by_layer:
            hooks.post(vp.attention(layer), keep_input(i))
            if by_layer[i + 1].placement == "mid":
                hooks.pre(vp.mlp_norm(layer), merge_mlp_input(i + 1))
                hooks.post(vp.mlp(layer), copy_mlp_output(i + 1))
