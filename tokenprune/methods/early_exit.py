"""Early exit: skip the layers a token or an image does not need.

Three mechanisms, one method (``tokenprune.patch(model, "early_exit", threshold=...)``):

* **LLM decoding, training-free (MuE-style)** -- Tang et al., "You Need Multiple Exiting: Dynamic
  Early Exiting for Accelerating Unified Vision Language Model", CVPR 2023. On every decode step,
  after each decoder layer ``j >= min_layer``, the cosine similarity between a sample's hidden state
  before and after the layer (MuE's "saturation" criterion, computed on the flattened state) is
  compared with ``threshold``; once it is reached the sample skips the remaining layers and the
  model's final norm and LM head read the exit state. Later tokens still attend to the skipped
  layers, so each skipped layer ``l`` appends the keys/values of the exit state projected by layer
  ``l``'s own ``input_layernorm``/``k_proj``/``v_proj`` (with RoPE at the token's position): the
  cache holds exactly what layer ``l`` would store if it passed the exit state through unchanged.
  (MuE copies the exit layer's state into the skipped layers' incremental state; on a decoder-only
  LLM without per-layer heads this projection is the consistent analogue -- an adaptation, and
  training-free use on LLaVA is itself an adaptation of MuE, which trains layer-wise losses.)

  Batches exit **per sample**: each sample's decision is its own (a batch gives the same tokens as
  each sample alone); rows that have exited are frozen (their layer output is replaced by their
  input, so the layer's own K/V computation for them equals the fill above) and the layers are
  skipped outright -- no attention, no MLP -- once every sample of the batch has exited. Only decode
  steps exit (one new token per row with a cache); the prefill, whose keys and values every later
  token reads at every layer, always runs all layers.

* **Vision tower.** (a) Inside a VLM, encoder layers whose output nothing reads are never computed:
  LLaVA reads ``hidden_states[vision_feature_layer]`` (-2), so the last CLIP layer is skipped; this is
  exact. (b) MuE's image-token rule with its own ``vision_threshold``: after encoder layer ``i >=
  vision_min_layer`` an image (row of the encoder batch; a LLaVA-NeXT tile is its own row) whose
  whole token state moved less than the threshold (cosine similarity of the flattened state) is
  frozen; later layers run only on the rows still active, so each exit saves that image's compute.

* **ViT classification, LGViT-style** -- Xu et al., "LGViT: Dynamic Early Exiting for Accelerating
  Vision Transformer", ACM MM 2023. Exit heads (:mod:`tokenprune.early_exit_heads`, trained by
  self-distillation from the final head with the backbone frozen) read intermediate layers of a
  ``ViTForImageClassification``; a sample exits at the first head whose max softmax probability
  reaches ``threshold`` (LGViT's ``confidence`` strategy) and its logits are that head's.

``threshold`` is the main exit rule of the model: cosine similarity for LLM decoding (VLMs), head
confidence for a ViT classifier with ``heads`` (LGViT's scripts use 0.8; the default 0.99 is meant for
the cosine rule). ``None`` (or a value above 1) never fires. ``min_layer`` / ``vision_min_layer``
default to half the depth. Inference only: with exit heads, a ``loss`` computed from ``labels`` is
the final head's, not recomputed from the exit logits. The trace
(``handle.trace.early_exit``, a :class:`~tokenprune.core.trace.ExitRecord`) records the layers each
decoded token, encoded image and classified sample used.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.base import Anatomy
from ..core.hooks import HookSet, bind
from ..core.scoring import apply_rope
from ..core.stage import Stage
from ..core.state import ForwardState, cache_length, cache_of
from ..core.trace import ExitRecord, Trace
from ..errors import MethodArgumentError
from .base import Method, register


def _similarity(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """MuE's saturation score per row: cosine similarity of the flattened states (fp32)."""
    return F.cosine_similarity(before.flatten(1).float(), after.flatten(1).float(), dim=-1)


def _wrap_forward(hooks: HookSet, module: nn.Module, run: Callable) -> None:
    """Shadow ``module.forward`` on the instance (undone by ``hooks.remove()``) with
    ``run(original, args, kwargs)``; module hooks keep firing around it."""
    original = module.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        return run(original, args, kwargs)

    hooks.setattr(module, "forward", forward)


def feature_layers_read(feature_layer: int | list[int] | None, num_layers: int) -> int:
    """The deepest encoder layer (0-based) whose output a VLM reads for ``vision_feature_layer``:
    ``hidden_states[i]`` is the output of layer ``i - 1`` (index 0 = embeddings)."""
    if feature_layer is None:
        return num_layers - 1
    idx = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    return max(int(i) % (num_layers + 1) for i in idx) - 1


@dataclass
class _DecodeStep:
    done: torch.Tensor  # (B,) bool: sample has exited
    last: torch.Tensor  # (B,) long: last decoder layer run
    n_done: int = 0  # python mirror of done.sum() (one device sync per layer, not three)


@dataclass
class _EncoderPass:
    done: torch.Tensor  # (T,) bool
    layers: torch.Tensor  # (T,) encoder layers run
    n_done: int = 0
    logits: torch.Tensor | None = None  # (T, C) exit-head logits of exited rows


@dataclass
class _Runtime(threading.local):
    """Per-forward state of the early-exit hooks (``ForwardState.early_exit``); per thread, like
    :class:`~tokenprune.core.state.ForwardState`."""

    step: _DecodeStep | None = None
    encoder: _EncoderPass | None = None
    read_up_to: int | None = None  # inside get_image_features: deepest encoder layer read
    own_trace: Trace | None = None
    vision: torch.Tensor | None = None  # (T,) layers run by the last encoder forward


def _record(state: ForwardState, make: Callable[[], Trace] | None = None) -> ExitRecord | None:
    trace = state.trace
    if trace is None and make is not None:
        trace = state.trace = make()
    if trace is None:
        return None
    if trace.early_exit is None:
        trace.early_exit = ExitRecord()
    return trace.early_exit


@register
@dataclass
class EarlyExit(Method):
    """Early exit (MuE, CVPR 2023; LGViT, ACM MM 2023): skip remaining layers once the state saturates
    (LLM decoding, vision tower) or an exit head is confident (ViT classification)."""

    name = "early_exit"
    summary = "early exit: MuE similarity exit in LLM decoding / vision tower, LGViT exit heads for ViT"
    sites = ("vision", "llm")
    reduces_tokens = False  # it skips layers; ``threshold`` / ``vision_threshold`` set it, never ``budget``
    threshold: float | None = 0.99
    min_layer: int | None = None
    vision_threshold: float | None = None
    vision_min_layer: int | None = None
    skip_unused_vision: bool = True
    heads: Any = None  # ExitHeads, or a path to a heads safetensors file (ViT classifier)

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        return []

    # -- validation ---------------------------------------------------------------------------
    @staticmethod
    def _check_threshold(name: str, value: float | None) -> None:
        if value is not None and not isinstance(value, (int, float)):
            raise MethodArgumentError(f"{name}: expected a number or None, got {value!r}")

    @staticmethod
    def _check_layer(name: str, value: int | None, n: int) -> int:
        if value is None:
            return n // 2
        if not isinstance(value, int) or not 0 <= value < n:
            raise MethodArgumentError(f"{name}: expected a layer index in [0, {n - 1}], got {value!r}")
        return value

    def _load_heads(self):
        if self.heads is None:
            return None
        from ..early_exit_heads import ExitHeads

        if isinstance(self.heads, ExitHeads):
            return self.heads
        if isinstance(self.heads, (str, Path)):
            return ExitHeads.load(self.heads)
        raise MethodArgumentError(f"heads: expected ExitHeads or a safetensors path, got {type(self.heads).__name__}")

    # -- install ------------------------------------------------------------------------------
    def install(self, anatomy: Anatomy, hooks: HookSet, state: ForwardState) -> None:
        self._check_threshold("threshold", self.threshold)
        self._check_threshold("vision_threshold", self.vision_threshold)
        rt = _Runtime()
        state.early_exit = rt
        heads = self._load_heads()
        classifier = _classifier_of(anatomy)
        if heads is not None and classifier is None:
            raise MethodArgumentError(
                f"heads: exit heads are for ViTForImageClassification; got a {anatomy.name} model"
            )
        if heads is None and not anatomy.is_vlm and self.vision_threshold is None:
            raise MethodArgumentError(
                f"early_exit: on a standalone {anatomy.name} encoder give vision_threshold= (MuE similarity exit) "
                "or, for ViTForImageClassification, heads= (LGViT exit heads; tokenprune.early_exit_heads)"
            )
        if self.vision_threshold is not None and anatomy.vision.tower != "batched":
            raise MethodArgumentError(
                f"vision_threshold: the image exit freezes rows of a batched encoder; {anatomy.name}'s vision tower "
                "packs every image into one sequence; allowed here: None"
            )
        if anatomy.is_vlm:
            self._install_llm(anatomy, hooks, state, rt)
        self._install_encoder(anatomy, hooks, state, rt, heads if classifier is not None else None)

    # -- LLM decoding -------------------------------------------------------------------------
    def _install_llm(self, anatomy: Anatomy, hooks: HookSet, state: ForwardState, rt: _Runtime) -> None:
        lp = anatomy.llm
        n = lp.num_layers
        vision_layers = anatomy.vision.num_layers

        def start(mod, kw):
            if cache_length(cache_of(kw), 0) == 0:  # prefill (the pre-LLM hook made a new trace)
                rec = _record(state)
                if rec is not None:
                    rec.num_layers = n
                    rec.vision_num_layers = vision_layers
                    rec.vision = rt.vision
            return None

        hooks.pre(lp.layers[0], start)
        if self.threshold is None:
            return
        first = self._check_layer("min_layer", self.min_layer, n)
        thr = float(self.threshold)

        def fill_kv(layer: nn.Module, hs: torch.Tensor, kw: dict) -> None:
            """Append layer ``layer``'s keys/values of ``hs`` (the exit state passing through)."""
            cache = cache_of(kw)
            if cache is None:
                return
            attn = lp.attention(layer)
            x = lp.input_norm(layer)(hs)
            b, q, _ = x.shape
            hd = attn.head_dim
            k = attn.k_proj(x).view(b, q, -1, hd).transpose(1, 2)
            k_norm = lp.head_norms(attn)[1]  # Qwen3: the layer's per-head key norm comes before RoPE
            k = k if k_norm is None else k_norm(k)
            v = attn.v_proj(x).view(b, q, -1, hd).transpose(1, 2)
            cos, sin = kw["position_embeddings"]
            cache.update(apply_rope(k, cos, sin), v, attn.layer_idx)

        def make(j: int, layer: nn.Module):
            def run(original, args, kwargs):
                kw = bind(layer, args, kwargs)
                hs = kw["hidden_states"]
                if hs.shape[1] != 1 or cache_length(cache_of(kw), j) == 0:
                    return original(*args, **kwargs)  # prefill / multi-token steps: full depth
                if j == first or rt.step is None:
                    b = hs.shape[0]
                    rt.step = _DecodeStep(torch.zeros(b, dtype=torch.bool, device=hs.device),
                                          torch.full((b,), n - 1, dtype=torch.long, device=hs.device))
                step = rt.step
                if step.n_done == hs.shape[0]:
                    fill_kv(layer, hs, kw)
                    out = hs
                else:
                    out = original(*args, **kwargs)
                    if step.n_done:
                        out = torch.where(step.done[:, None, None], hs, out)
                    if j < n - 1:
                        new = ~step.done & (_similarity(hs, out) >= thr)
                        step.last = torch.where(new, j, step.last)
                        step.done = step.done | new
                        step.n_done = int(step.done.sum())
                if j == n - 1:
                    rec = _record(state)
                    if rec is not None:
                        rec.num_layers = n
                        rec.decode.append((step.last + 1).cpu())
                    rt.step = None
                return out

            return run

        for j in range(first, n):
            _wrap_forward(hooks, lp.layers[j], make(j, lp.layers[j]))

    # -- encoder (vision tower, standalone encoders, ViT classifier) --------------------------
    def _install_encoder(self, anatomy: Anatomy, hooks: HookSet, state: ForwardState, rt: _Runtime, heads) -> None:
        vp = anatomy.vision
        n = vp.num_layers
        vthr = None if self.vision_threshold is None else float(self.vision_threshold)
        vfirst = self._check_layer("vision_min_layer", self.vision_min_layer, n)
        cthr = None if self.threshold is None else float(self.threshold)
        head_at = {} if heads is None else heads.by_layer(n)
        skip_unused = anatomy.is_vlm and self.skip_unused_vision
        if not (skip_unused or vthr is not None or head_at):
            return

        if skip_unused:  # only inside get_image_features do we know which layers are read
            core = anatomy.vlm_core
            original = core.get_image_features
            sig = inspect.signature(original)
            default = anatomy.feature_layer

            @functools.wraps(original)
            def get_image_features(*args, **kwargs):
                bound = sig.bind_partial(*args, **kwargs).arguments
                fl = bound.get("vision_feature_layer")
                rt.read_up_to = feature_layers_read(default if fl is None else fl, n)
                try:
                    return original(*args, **kwargs)
                finally:
                    rt.read_up_to = None

            hooks.setattr(core, "get_image_features", get_image_features)

        def new_trace(t: int) -> Trace:
            return Trace(torch.full((t,), vp.grid[0] * vp.grid[1]), n, "vision")

        def begin(mod, kw):
            hs = kw["hidden_states"]
            t = hs.shape[0]
            rt.encoder = _EncoderPass(torch.zeros(t, dtype=torch.bool, device=hs.device),
                                      torch.full((t,), n, dtype=torch.long, device=hs.device))
            if not anatomy.is_vlm:  # standalone: a trace per forward (a vision stage may have made it)
                if state.trace is None or state.trace is rt.own_trace:
                    rt.own_trace = state.trace = new_trace(t)
            return None

        hooks.pre(vp.layers[0], begin)

        def make(i: int, layer: nn.Module):
            def run(original, args, kwargs):
                kw = bind(layer, args, kwargs)
                hs = kw["hidden_states"]
                enc = rt.encoder
                if enc is None or enc.done.shape[0] != hs.shape[0]:
                    return original(*args, **kwargs)
                last = n - 1 if rt.read_up_to is None else rt.read_up_to
                if i > last:  # nothing reads this layer's output (LLaVA's last CLIP layer)
                    enc.layers = torch.minimum(enc.layers, torch.full_like(enc.layers, last + 1))
                    out = hs
                elif enc.n_done == hs.shape[0]:
                    out = hs
                elif enc.n_done:  # rows are independent in an encoder: run the active ones
                    rows = (~enc.done).nonzero().flatten()
                    sub = dict(kw)
                    sub["hidden_states"] = hs[rows]
                    mask = kw.get("attention_mask")
                    if isinstance(mask, torch.Tensor) and mask.dim() > 0 and mask.shape[0] == hs.shape[0]:
                        sub["attention_mask"] = mask[rows]
                    out = hs.clone()
                    out[rows] = original(**sub)
                else:
                    out = original(*args, **kwargs)
                check_sim = vthr is not None and i >= vfirst
                check_head = i in head_at and cthr is not None
                if i < last and (check_sim or check_head) and enc.n_done < hs.shape[0]:
                    new = torch.zeros_like(enc.done)
                    if check_sim:
                        new |= ~enc.done & (_similarity(hs, out) >= vthr)
                    if check_head:
                        active = ~enc.done & ~new
                        whole = enc.n_done == 0 and not check_sim  # batch 1 / nothing exited: no gathers
                        rows = None if whole else active.nonzero().flatten()
                        if whole or rows.numel():
                            logits, _ = head_at[i](out if whole else out[rows])
                            ok = logits.float().softmax(-1).amax(-1) >= cthr
                            if enc.logits is None:
                                enc.logits = logits.new_zeros(hs.shape[0], logits.shape[-1])
                            if whole:
                                enc.logits = torch.where(ok[:, None], logits, enc.logits)
                                new = new | ok
                            else:
                                enc.logits[rows[ok]] = logits[ok]
                                new[rows[ok]] = True
                    enc.layers = torch.where(new, i + 1, enc.layers)
                    enc.done = enc.done | new
                    enc.n_done = int(enc.done.sum())
                if i == n - 1:
                    rt.vision = enc.layers.cpu()
                    rec = _record(state) if not anatomy.is_vlm else None
                    if rec is not None:
                        rec.vision = rt.vision
                        rec.vision_num_layers = n
                        if heads is not None:
                            rec.classify = rt.vision
                return out

            return run

        for i, layer in enumerate(vp.layers):
            _wrap_forward(hooks, layer, make(i, layer))

        if head_at:
            def answer(mod, kw, output):
                enc = rt.encoder
                if enc is None or enc.logits is None or not enc.n_done:
                    return None
                at = 1 if kw.get("labels") is not None else 0
                logits = output.logits if hasattr(output, "logits") else output[at]
                done = enc.done.to(logits.device)[:, None]
                new = torch.where(done, enc.logits.to(logits.dtype), logits)
                if hasattr(output, "logits"):
                    output.logits = new
                    return output
                out = list(output)
                out[at] = new
                return tuple(out)

            hooks.post(anatomy.model, answer)
            heads.to(next(anatomy.model.parameters()).device)


def _classifier_of(anatomy: Anatomy) -> nn.Module | None:
    """The ``ViTForImageClassification`` of a standalone ViT anatomy, else None."""
    from transformers import ViTForImageClassification

    return anatomy.model if isinstance(anatomy.model, ViTForImageClassification) else None
