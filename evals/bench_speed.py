"""Prefill and decode speed of every method at one budget, and FastV's scoring against the way the
official code and LightCompress obtain it, side by side in one run (issue #23).

The model (``--model``) is a random-init VLM with the language-model geometry of LLaVA-1.5-7B
(hidden 4096, 32 heads, FFN 11008, 32 layers; 576 visual tokens of a 336-px image, a 641-token
prompt) or of Qwen2.5-VL-7B (hidden 3584, 28 query / 4 key-value heads, FFN 18944, 28 layers,
M-RoPE; ``--image`` px square image, 256 visual tokens at 448 px), built through transformers'
own classes so that tokenprune patches it through its real adapter. The vision tower is one
narrow block on the same patch grid: the time is the LLM's. ``--layers`` decoder layers (default:
the full depth); ``--shared-weights`` gives every decoder layer the same weight tensors: each
layer is its own module (its own hooks, KV-cache slot and pruning schedule) and computes exactly
what a layer of the real model computes, but the memory is one layer's (fp32 LLaVA-1.5-7B needs
26 GB at 32 layers with distinct weights). At 0.8-0.9 GB per layer the weights stream from memory
either way (the CPU's last-level cache is 16 MB), so sharing them changes no cache behaviour the
benchmark could profit from. ``--dtype`` float32 by default: CPUs without bf16 instructions, such
as this AVX2 one, run bf16 matmuls several times slower (``gemm_probe`` in the JSON records both
rates). Variants, measured round-robin (one run of each per round, so load drifts hit all of them
alike), each through one greedy ``generate`` call of ``--new-tokens`` + 1 tokens:

* ``none``: the unpruned model; every method of ``--methods`` at ``--budget``;
* ``fastv[rerun]``: FastV whose scores are obtained as LightCompress (``token_reduction/fastv.py``)
  and the official FastV KV-cache code (``FastVLlamaModel.forward``) do: at batch 1, decoder layer
  K-1 runs a second time with eager attention and ``output_attentions=True`` and its weights, last
  row, mean over heads, rank the image tokens. ``fastv[eager]``: as the official in-place FastV code,
  layer K-1 itself runs eager attention and returns its weights. Both then select with FastV's own
  top-k, so their kept sets must equal ours: the run stops after its first round otherwise;
* ``control``: the unpatched model on a text-only prompt as long as the sequence random/uniform
  leave: the speed-up this machine gives a shorter sequence with no pruning machinery at all.

Per run: ``prefill_s`` (start of ``generate`` to the first token's logits), ``decode_s`` (median
interval between the later tokens' logits: one decode step), ``overhead_s`` (inside tokenprune's
hooks in the prefill), ``select_s`` (inside the methods' ``select``: scoring + top-k), and
``peak_mib``: the resident memory the prefill adds at its peak (VmHWM reset through
``/proc/self/clear_refs`` before it, minus VmRSS then; glibc's mmap threshold is fixed at 64 KiB so
that freed tensors leave the resident set). Timings are min and median over ``--repeats`` rounds
after ``--warmup``. Ideal speed-ups are analytic MAC ratios (:mod:`tokenprune.flops`) at this depth
and at the full depth (from each method's schedule on a narrow full-depth stand-in when
``--layers`` is less). PyramidDrop projects the keys of the layer about to run for scoring and
that layer reuses the kept rows: its net scoring time subtracts the key projection of the kept
rows, timed on the same rows right after the rounds. A torch.profiler table of the top ops of the
unpruned and the random-pruned prefill closes the run.

``python -m evals.bench_speed --out evals/results`` writes ``bench_speed.json`` and ``.md``
(``bench_speed_qwen2_5_vl.*`` for ``--model qwen2_5_vl``, ``<stem>.*`` with ``--stem``).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

import tokenprune
from tokenprune import flops
from tokenprune.core.select import keep_counts
from tokenprune.methods.base import Method, build
from tokenprune.methods.fastv import FastV

from .results import NOISY_SPREAD

DEFAULT_METHODS = ("random", "uniform", "fastv", "pdrop", "feather")
PEERS = ("fastv[rerun]", "fastv[eager]")
LLM_STAGE_METHODS = ("fastv", "pdrop", "feather", *PEERS)


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class Spec:
    """A VLM's language-model geometry and its image: ``family`` ``"llava"`` (Llama LM, CLIP grid
    of ``(image / patch)^2`` tokens) or ``"qwen2_5_vl"`` (M-RoPE LM, 2x2-merged patches:
    ``(image / patch / 2)^2`` tokens)."""

    name: str
    family: str
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    layers: int
    image: int
    patch: int = 14
    vocab: int = 1024

    @property
    def visual_tokens(self) -> int:
        side = self.image // self.patch // (2 if self.family == "qwen2_5_vl" else 1)
        return side * side

    def narrow(self) -> Spec:
        """The same depth, image and family at width 64 (only token schedules are read from it)."""
        return dataclasses.replace(self, hidden=64, heads=4, kv_heads=4 if self.kv_heads == self.heads else 2, ffn=128)


SPECS = {
    "llava": Spec("LLaVA-1.5-7B", "llava", hidden=4096, heads=32, kv_heads=32, ffn=11008, layers=32, image=336),
    "qwen2_5_vl": Spec("Qwen2.5-VL-7B", "qwen2_5_vl", hidden=3584, heads=28, kv_heads=4, ffn=18944, layers=28,
                       image=448),
}


def _share_layers(model: Any, layers: int) -> None:
    """Grow the one-layer language model of ``model`` to ``layers`` decoder layers that all hold
    layer 0's weight tensors: distinct modules (own ``layer_idx``, hooks, cache slot), one set of
    weights."""
    lm = model.model.language_model
    cfg = lm.config
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[0]] * layers
    first = lm.layers[0]
    for i in range(1, layers):
        with torch.device("meta"):
            layer = type(first)(cfg, layer_idx=i)
        for name, mod in layer.named_modules():
            src = first.get_submodule(name)
            for pn, p in src.named_parameters(recurse=False):
                setattr(mod, pn, p)
            for bn, b in src.named_buffers(recurse=False):
                mod.register_buffer(bn, b)
        lm.layers.append(layer)


def build_model(spec: Spec, layers: int | None = None, shared: bool = False, seed: int = 0) -> nn.Module:
    """Random-init VLM of ``spec`` with ``layers`` decoder layers (default: its full depth), each
    with its own weights or, ``shared``, all with the same (see :func:`_share_layers`); sdpa."""
    layers = layers or spec.layers
    built = 1 if shared else layers
    torch.manual_seed(seed)
    if spec.family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        text = LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.ffn,
                           num_hidden_layers=built, num_attention_heads=spec.heads,
                           num_key_value_heads=spec.kv_heads, max_position_embeddings=4096, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2)
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                  image_size=spec.image, patch_size=spec.patch, projection_dim=64)
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=spec.vocab - 1,
                          vision_feature_layer=-1, vision_feature_select_strategy="default")
        model = LlavaForConditionalGeneration(cfg)
    elif spec.family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        half = spec.hidden // spec.heads // 2  # M-RoPE sections (t, h, w) in Qwen2.5-VL's 1:1.5:1.5 split
        text = dict(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.ffn,
                    num_hidden_layers=built, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                    max_position_embeddings=32768, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                     "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]})
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=spec.hidden,
                      patch_size=spec.patch, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[0], in_channels=3)
        v = spec.vocab
        cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=v - 4, video_token_id=v - 3,
                               vision_start_token_id=v - 2, vision_end_token_id=v - 1)
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    else:
        raise ValueError(f"family: expected 'llava' or 'qwen2_5_vl', got {spec.family!r}")
    if shared:
        _share_layers(model, layers)
    model.eval().set_attn_implementation("sdpa")
    return model


def make_inputs(model: nn.Module, spec: Spec, before: int = 35, after: int = 30, seed: int = 0) -> dict:
    """One prompt: ``before`` text tokens, the image's visual tokens (Qwen: between its vision
    start / end tokens), ``after`` text tokens; batch 1."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, spec.vocab - 4, (n,), generator=g)  # noqa: E731
    image = torch.full((spec.visual_tokens,), cfg.image_token_id)
    if spec.family == "llava":
        ids = torch.cat([torch.tensor([1]), text(before - 1), image, text(after)])
        pix = torch.randn(1, 3, spec.image, spec.image, generator=g)
        return {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None], "pixel_values": pix}
    ids = torch.cat([torch.tensor([1]), text(before - 2), torch.tensor([cfg.vision_start_token_id]), image,
                     torch.tensor([cfg.vision_end_token_id]), text(after)])
    side = spec.image // spec.patch
    return {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None],
            "mm_token_type_ids": (ids == cfg.image_token_id).long()[None],
            "pixel_values": torch.randn(side * side, 3 * 2 * spec.patch**2, generator=g),
            "image_grid_thw": torch.tensor([[1, side, side]])}


# ----------------------------------------------------------------------------- clocks


class TimedMethod(Method):
    """Wraps a method so the time inside its stages' ``select`` (scoring + selection) is summed;
    the inner method's own hooks are installed."""

    def __init__(self, inner: Method) -> None:
        self.inner = inner
        self.name = inner.name
        self.summary = inner.summary
        self.elapsed = 0.0

    def stages(self, anatomy, budget):
        out = []
        for st in self.inner.stages(anatomy, budget):
            def select(ctx, _f=st.select):
                t0 = time.perf_counter()
                try:
                    return _f(ctx)
                finally:
                    self.elapsed += time.perf_counter() - t0
            out.append(dataclasses.replace(st, select=select))
        return out

    def install(self, anatomy, hooks, state) -> None:
        self.inner.install(anatomy, hooks, state)


class HookClock:
    """Time spent in tokenprune's forward pre-hooks: a pre-hook registered *before* the patch (prepended)
    and one *after* it bracket the engine's hooks on each module; the vision tower's time (which the
    pre-LLM hook triggers on the forward path, up to its projector's output) is subtracted."""

    def __init__(self, model: Any) -> None:
        core = model.model
        self.modules = [core, *core.language_model.layers]
        self.starts: dict[Any, float] = {}
        self.total = 0.0
        self.vision = 0.0
        self.handles = [m.register_forward_pre_hook(self._start(i), prepend=True) for i, m in enumerate(self.modules)]
        self._v0 = 0.0
        self.layer_s = [0.0] * (len(self.modules) - 1)
        self.handles += [m.register_forward_hook(self._layer_end(i)) for i, m in enumerate(self.modules) if i > 0]
        tower = getattr(core, "vision_tower", None) or core.visual
        self.handles.append(tower.register_forward_pre_hook(self._vstart))
        self.handles.append(getattr(core, "multi_modal_projector", tower).register_forward_hook(self._vend))

    def _start(self, i):
        def hook(*_):
            self.starts[i] = self.starts[f"layer{i}"] = time.perf_counter()
        return hook

    def _layer_end(self, i):
        def hook(*_):
            if f"layer{i}" in self.starts:
                self.layer_s[i - 1] += time.perf_counter() - self.starts.pop(f"layer{i}")
        return hook

    def _end(self, i):
        def hook(*_):
            if i in self.starts:
                self.total += time.perf_counter() - self.starts.pop(i)
        return hook

    def _vstart(self, *_):
        self._v0 = time.perf_counter()

    def _vend(self, *_):
        self.vision += time.perf_counter() - self._v0

    def close_bracket(self) -> None:
        """Register the closing hooks (call after ``tokenprune.patch``)."""
        self.handles += [m.register_forward_pre_hook(self._end(i)) for i, m in enumerate(self.modules)]

    def reset(self) -> None:
        self.total, self.vision, self.starts = 0.0, 0.0, {}
        self.layer_s = [0.0] * len(self.layer_s)

    @property
    def overhead(self) -> float:
        return max(0.0, self.total - self.vision)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _spread(times: list[float]) -> float:
    """(slowest - fastest) / median of repeated timings."""
    return (max(times) - min(times)) / statistics.median(times)


# ----------------------------------------------------------------------------- memory and load


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def _reset_peak() -> int:
    """Reset the process's peak resident set (VmHWM) to now; returns VmRSS in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def _fix_mmap_threshold(nbytes: int = 1 << 16) -> bool:
    """glibc: serve every allocation above ``nbytes`` by mmap, so freeing it shrinks the RSS."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, nbytes))  # M_MMAP_THRESHOLD
    except OSError:
        return False


# ----------------------------------------------------------------------------- peer-style FastV


@dataclasses.dataclass
class PeerFastV(Method):
    """FastV selecting on attention weights obtained the peers' way (batch 1, see the module
    docstring): ``mode="rerun"`` runs layer K-1 a second time with eager attention and
    ``output_attentions=True``; ``mode="eager"`` runs layer K-1 itself with eager attention."""

    name = "fastv"
    summary = "FastV, scores from eager attention weights of layer K-1 (peer implementations)"
    sites = ("llm",)
    mode: str = "rerun"

    def __post_init__(self) -> None:
        self.layer = 0
        self.row: torch.Tensor | None = None  # (1, L) last row of layer K-1's weights, mean over heads
        self.visual: torch.Tensor | None = None
        self.busy = False
        self.rerun_s = 0.0

    def stages(self, anatomy, budget):
        (stage,) = FastV().stages(anatomy, budget)
        self.layer = stage.layer

        def select(ctx):
            if ctx.orig.shape[0] != 1:
                raise ValueError("the peer implementations run at batch size 1")
            cols = (self.visual[0] >= 0).nonzero().flatten()  # the image tokens' columns, in order
            scores = self.row[:, cols][:, ctx.orig[0]].float()
            return stage.select(dataclasses.replace(ctx, scorers={"last_token_attention": lambda **_: scores}))

        return [dataclasses.replace(stage, select=select)]

    def install(self, anatomy, hooks, state) -> None:
        layer = anatomy.llm.layers[self.layer - 1]
        attn = anatomy.llm.attention(layer)
        cfg = attn.config
        backend = cfg._attn_implementation

        def causal(kw):  # the 4-D additive mask eager attention needs (the official code builds it)
            h = kw["hidden_states"]
            n = h.shape[1]
            return torch.full((n, n), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)[None, None]

        def weights(mod, kw, out):
            if self.busy:
                self.row = out[1].mean(1)[:, -1]
            return None

        def prefill(kw) -> bool:
            return state.llm_input is not None and kw["hidden_states"].shape[1] > 1 and not self.busy

        def rerun(mod, kw):
            if prefill(kw):
                t0 = time.perf_counter()
                self.visual, self.busy = state.llm_input.visual, True
                cfg._attn_implementation = "eager"
                try:
                    no_cache = {name: None for name in ("past_key_values", "cache") if name in kw}  # 5.24 renamed it
                    mod.forward(**{**kw, **no_cache, "attention_mask": causal(kw), "use_cache": False})
                finally:
                    cfg._attn_implementation, self.busy = backend, False
                self.rerun_s += time.perf_counter() - t0
            return None

        def to_eager(mod, kw):
            if not prefill(kw):
                return None
            self.visual, self.busy = state.llm_input.visual, True
            cfg._attn_implementation = "eager"
            return {**kw, "attention_mask": causal(kw)}

        def back(mod, kw, out):
            if self.busy:
                cfg._attn_implementation, self.busy = backend, False
            return None

        hooks.post(attn, weights)
        if self.mode == "rerun":
            hooks.pre(layer, rerun)
        else:
            hooks.pre(layer, to_eager)
            hooks.post(layer, back)


# methods' parameters per family: renumbering positions has no meaning for M-RoPE's 3-D ids
PARAMS = {"qwen2_5_vl": {"pdrop": {"positions": "keep"}}}


def _method(variant: str, family: str = "llava") -> Method:
    if variant in PEERS:
        return PeerFastV(mode=variant[len("fastv["):-1])
    return build(variant, **PARAMS.get(family, {}).get(variant, {}))


# ----------------------------------------------------------------------------- one timed run


class Stamps(LogitsProcessor):
    """Records when each token's logits are ready, and the hook clocks and peak memory at the first
    (the end of the prefill)."""

    def __init__(self, clock: HookClock, timed: TimedMethod | None) -> None:
        self.clock, self.timed, self.times, self.at_prefill = clock, timed, [], {}

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        if len(self.times) == 1:
            self.at_prefill = {
                "overhead_s": self.clock.overhead, "select_s": self.timed.elapsed if self.timed else 0.0,
                "layer_s": list(self.clock.layer_s), "hwm_kib": _status_kib("VmHWM"),
            }
        return scores


class KeyInputs:
    """The inputs of every decoder layer's ``k_proj`` in a prefill, seen before tokenprune's hooks
    (prepended), and the time of each call: at a PyramidDrop stage layer the first call is the
    scoring's projection of all rows and the second the layer's own call on the kept rows (which the
    engine then skips, handing over the kept rows of the first)."""

    def __init__(self, model: Any) -> None:
        self.calls: dict[int, list[torch.Tensor]] = {}
        self.times: dict[int, list[float]] = {}
        self.t0 = 0.0
        self.handles = []
        for j, layer in enumerate(model.model.language_model.layers):
            self.handles.append(layer.self_attn.k_proj.register_forward_pre_hook(self._start(j), prepend=True))
            self.handles.append(layer.self_attn.k_proj.register_forward_hook(self._end(j)))

    def _start(self, j: int):
        def hook(mod, args):
            if args[0].shape[1] > 1:
                self.calls.setdefault(j, []).append(args[0])
                self.t0 = time.perf_counter()
        return hook

    def _end(self, j: int):
        def hook(mod, args, out):
            if len(self.calls.get(j, ())) > len(self.times.get(j, ())):
                self.times.setdefault(j, []).append(time.perf_counter() - self.t0)
        return hook

    def pairs(self) -> list[tuple[int, torch.Tensor, torch.Tensor, float]]:
        """(layer, all rows, kept rows, time of the all-rows projection in the run) of each layer
        whose keys were projected twice."""
        return [(j, c[0], c[1], self.times[j][0]) for j, c in sorted(self.calls.items()) if len(c) == 2]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _one(model, inputs, variant: str, budget: float, new_tokens: int, family: str = "llava") -> dict[str, Any]:
    """One ``generate`` of ``variant`` (``none`` / ``control`` unpatched)."""
    clock = HookClock(model)
    keys = KeyInputs(model) if variant == "pdrop" else None
    timed = handle = None
    try:
        if variant not in ("none", "control"):
            timed = TimedMethod(_method(variant, family))
            handle = tokenprune.patch(model, timed, budget=budget)
        clock.close_bracket()
        clock.reset()
        stamps = Stamps(clock, timed)
        gc.collect()
        rss0 = _reset_peak()
        load = os.getloadavg()[0]
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(**inputs, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False,
                           logits_processor=LogitsProcessorList([stamps]), pad_token_id=0)
        steps = [b - a for a, b in zip(stamps.times, stamps.times[1:])]
        at = stamps.at_prefill
        peer = timed.inner if timed is not None and isinstance(timed.inner, PeerFastV) else None
        return {
            "prefill_s": stamps.times[0] - t0, "decode_s": statistics.median(steps), "decode_steps_s": steps,
            "overhead_s": at["overhead_s"] if handle is not None else 0.0, "select_s": at["select_s"],
            "rerun_s": peer.rerun_s if peer is not None else 0.0, "layer_s": at["layer_s"],
            "peak_mib": (at["hwm_kib"] - rss0) / 1024, "load1": load,
            "trace": handle.trace if handle is not None else None,
            "key_inputs": keys.pairs() if keys is not None else [],
        }
    finally:
        if handle is not None:
            handle.remove()
        clock.remove()
        if keys is not None:
            keys.remove()


# ----------------------------------------------------------------------------- analytic ideals


def _decode_bytes(geo: flops.DecoderGeometry, cache: list[float], elem: int) -> float:
    """Bytes one decode step reads per sample: every layer's weights and its KV cache."""
    weights = geo.hidden * (2 * geo.d_q + 2 * geo.d_kv) + (3 if geo.gated else 2) * geo.hidden * geo.ffn
    return sum(elem * (weights + 2 * c * geo.d_kv) for c in cache)


def scoring_macs(geo: flops.DecoderGeometry, method: str, tokens: list[float]) -> float:
    """MACs our scoring adds to a pruned prefill where layer j sees ``tokens[j]`` tokens: per stage
    (a layer where the count drops) the last token's query and its logits to every key, and for
    PyramidDrop, which ranks with the keys of the layer about to run, those of the tokens it drops
    (the kept tokens' keys are that layer's own, projected once)."""
    total = 0.0
    for k in range(1, len(tokens)):
        if tokens[k] < tokens[k - 1]:
            total += geo.hidden * geo.d_q + geo.d_q * tokens[k - 1]
            if method == "pdrop":
                total += geo.hidden * geo.d_kv * (tokens[k - 1] - tokens[k])
    return total


def schedules_at_full(spec: Spec, variants: list[str], budget: float) -> dict[str, list[float]]:
    """Tokens entering each of the full depth's decoder layers for each variant: the methods run once
    on a narrow full-depth stand-in with the benchmark's prompt (only the schedule matters, not the
    width)."""
    narrow = spec.narrow()
    stand_in = build_model(narrow)
    inputs = make_inputs(stand_in, narrow)
    out = {"none": flops.estimate(stand_in, inputs)[0].llm_tokens_per_layer}
    for v in variants:
        if v in (*PEERS, "none", "control"):
            continue
        with tokenprune.patch(stand_in, _method(v, spec.family), budget=budget) as handle, torch.no_grad():
            stand_in(**inputs, logits_to_keep=1)
            out[v] = flops.estimate(stand_in, inputs, handle.trace)[0].llm_tokens_per_layer
    return out


def saved_projection(model: Any, runs: list[list[tuple[int, torch.Tensor, torch.Tensor, float]]],
                     repeats: int = 5) -> dict[str, Any]:
    """What PyramidDrop's reuse of its scoring keys saves, in the run's own time: at each stage layer
    the scoring's projection of all rows was timed in every run (``KeyInputs.pairs``, median over
    runs); the layer's own projection of the kept rows would have cost that times the ratio of the
    two projections timed back to back on the run's rows (min over ``repeats``, alternating), so
    machine load between the runs and this measurement cancels."""
    layers = model.model.language_model.layers
    micro_all, micro_kept, in_run = [], [], []
    with torch.no_grad():
        for i, (j, every, kept, _) in enumerate(runs[-1]):
            proj = layers[j].self_attn.k_proj
            t: dict[str, list[float]] = {"all": [], "kept": []}
            for _ in range(repeats):
                for name, x in (("all", every), ("kept", kept)):
                    t0 = time.perf_counter()
                    proj(x)
                    t[name].append(time.perf_counter() - t0)
            micro_all.append(min(t["all"]))
            micro_kept.append(min(t["kept"]))
            in_run.append(statistics.median(r[i][3] for r in runs))
    saved = [t * k / a for t, k, a in zip(in_run, micro_kept, micro_all)]
    last = runs[-1]
    return {"layers": [p[0] for p in last], "rows_all": [int(p[1].shape[1]) for p in last],
            "rows_kept": [int(p[2].shape[1]) for p in last], "all_s_in_run": sum(in_run),
            "saved_s": sum(saved), "all_s_in_run_per_stage": in_run, "saved_s_per_stage": saved,
            "back_to_back_all_s": micro_all, "back_to_back_kept_s": micro_kept}


def gemm_probe(rows: int = 128, width: int = 4096) -> dict[str, float]:
    """GFLOP/s of one (rows x width) @ (width x width) linear in float32 and bfloat16 (the model's
    projections at its width)."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(rows, width, dtype=dtype), torch.randn(width, width, dtype=dtype)
        torch.nn.functional.linear(x, w)
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        out[str(dtype).replace("torch.", "")] = 2 * rows * width * width / (time.perf_counter() - t0) / 1e9
    return out


class _Captured(Exception):
    """Stops a forward once the input of the layer under study is captured."""


def eager_attention_cost(model, inputs, layer: int, repeats: int = 3) -> dict[str, float]:
    """What running decoder layer ``layer``'s attention eagerly with its weights returned (the official
    in-place FastV) costs over sdpa, on that layer's real prefill input: the two are timed alternately
    (min over ``repeats``), each with the peak resident memory it adds."""
    attn = model.model.language_model.layers[layer].self_attn
    seen: dict[str, Any] = {}

    def grab(mod, args, kwargs):
        seen.update(kwargs)
        raise _Captured

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    hn, pe = seen["hidden_states"], seen["position_embeddings"]
    n = hn.shape[1]
    causal = torch.full((n, n), torch.finfo(hn.dtype).min, dtype=hn.dtype).triu(1)[None, None]
    cfg, backend = attn.config, attn.config._attn_implementation
    times: dict[str, list[float]] = {"sdpa": [], "eager": []}
    peaks: dict[str, list[float]] = {"sdpa": [], "eager": []}
    for _ in range(repeats):
        for mode in ("sdpa", "eager"):
            cfg._attn_implementation = mode
            try:
                gc.collect()
                rss0 = _reset_peak()
                t0 = time.perf_counter()
                with torch.no_grad():
                    mask = causal if mode == "eager" else None
                    _, w = attn(hidden_states=hn, position_embeddings=pe, attention_mask=mask)
                    if w is not None:
                        w.mean(1)[:, -1]
                times[mode].append(time.perf_counter() - t0)
                peaks[mode].append((_status_kib("VmHWM") - rss0) / 1024)
            finally:
                cfg._attn_implementation = backend
    return {"sdpa_s": min(times["sdpa"]), "eager_s": min(times["eager"]),
            "extra_s": min(times["eager"]) - min(times["sdpa"]),
            "sdpa_peak_mib": statistics.median(peaks["sdpa"]), "eager_peak_mib": statistics.median(peaks["eager"])}


def profile_ops(model, inputs, method: str | None, budget: float, top: int = 8) -> list[dict[str, Any]]:
    """torch.profiler's top ops (self CPU time) of one prefill, with the rate of the matmuls."""
    from torch.profiler import ProfilerActivity, profile

    handle = tokenprune.patch(model, method, budget=budget) if method else None
    try:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            model(**inputs, logits_to_keep=1)
    finally:
        if handle is not None:
            handle.remove()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6,
             "share": e.self_cpu_time_total / total,
             "gflops_per_s": (e.flops / (e.self_cpu_time_total / 1e6) / 1e9) if e.flops else None} for e in rows]


# ----------------------------------------------------------------------------- the benchmark


def run(model: str = "llava", layers: int | None = None, methods: list[str] | None = None, budget: float = 0.2,
        warmup: int = 1, repeats: int = 3, new_tokens: int = 4, dtype: str = "float32", peers: bool = True,
        control: bool = True, profile: bool = True, shared: bool = False, threads: int | None = 1,
        checkpoint: Path | None = None, log: Any = print, **geometry: int) -> dict[str, Any]:
    """Run the benchmark on ``SPECS[model]`` (fields overridden by ``geometry``: ``hidden``,
    ``heads``, ``kv_heads``, ``ffn``, ``image``, ``patch``) and return the result object (see the
    module docstring). ``checkpoint``: a JSON file rewritten after every round with the timings so
    far."""
    if threads:
        torch.set_num_threads(threads)
    spec = dataclasses.replace(SPECS[model], **geometry)
    layers = layers or spec.layers
    mmap_fixed = _fix_mmap_threshold()
    t_start = time.perf_counter()
    probe = gemm_probe(width=spec.hidden)
    vlm = build_model(spec, layers, shared).to(getattr(torch, dtype))
    inputs = make_inputs(vlm, spec)
    inputs["pixel_values"] = inputs["pixel_values"].to(vlm.dtype)
    n_vis = spec.visual_tokens
    prompt = int(inputs["input_ids"].shape[1])
    short = prompt - n_vis + int(keep_counts(torch.tensor([n_vis]), budget)[0])
    ids = torch.randint(3, spec.vocab - 4, (1, short), generator=torch.Generator().manual_seed(1))
    text_only = {"input_ids": ids, "attention_mask": torch.ones(1, short, dtype=torch.long)}
    log(f"built {spec.name} {layers}-layer {dtype} model (shared weights: {shared}) in "
        f"{time.perf_counter() - t_start:.1f} s; prompt {prompt} tokens; control {short} tokens; gemm {probe}")
    registered = tokenprune.methods()
    names = ["none", *[m for m in (methods or DEFAULT_METHODS) if m in registered]]
    names += [p for p in PEERS if peers and "fastv" in names]
    names += ["control"] if control else []
    samples: dict[str, list[dict[str, Any]]] = {m: [] for m in names}
    for r in range(warmup + repeats):
        kept = {}
        for m in names:
            res = _one(vlm, text_only if m == "control" else inputs, m, budget, new_tokens, spec.family)
            if r >= warmup:
                samples[m].append(res)
            if res["trace"] is not None:
                kept[m] = [st.kept for st in res["trace"].stages]
            log(f"round {r} {m}: prefill {res['prefill_s']:.3f} s, decode {res['decode_s'] * 1e3:.0f} ms/token, "
                f"select {res['select_s'] * 1e3:.1f} ms, peak +{res['peak_mib']:.0f} MiB, load {res['load1']:.1f}")
        for p in PEERS:  # the peers' scores must select exactly our kept set
            if p in kept and not all(torch.equal(a, b) for a, b in zip(kept[p], kept["fastv"], strict=True)):
                raise AssertionError(f"round {r}: {p} kept {kept[p]}, fastv kept {kept['fastv']}")
        if checkpoint is not None:
            keys = ("prefill_s", "decode_s", "select_s", "overhead_s", "rerun_s", "peak_mib", "load1")
            partial = {m: {k: [x[k] for x in v] for k in keys} for m, v in samples.items()}
            checkpoint.write_text(json.dumps({"round": r, "warmup": warmup, "samples": partial}, indent=1))
    setup = dict(spec=spec, layers=layers, shared=shared, dtype=dtype, threads=torch.get_num_threads(),
                 budget=budget, warmup=warmup, repeats=repeats, new_tokens=new_tokens, prompt=prompt, short=short,
                 probe=probe, mmap_fixed=mmap_fixed)
    res = summarise(vlm, inputs, samples, setup, log)
    if profile:
        log("profiling the unpruned and the random-pruned prefill")
        res["profile"] = {"none": profile_ops(vlm, inputs, None, budget),
                          "random": profile_ops(vlm, inputs, "random", budget)}
    res["wall_s"] = time.perf_counter() - t_start
    return res


def _speed(base: list[float], mine: list[float]) -> tuple[float, float]:
    """Speed-ups (base over mine) from the minima and from the medians."""
    return min(base) / min(mine), statistics.median(base) / statistics.median(mine)


def summarise(model, inputs, samples: dict[str, list[dict[str, Any]]], setup: dict[str, Any], log: Any = print):
    """The result object: one row per variant, with the ideals at this depth and at the full depth."""
    spec, layers, budget = setup["spec"], setup["layers"], setup["budget"]
    geo = flops.DecoderGeometry.from_config(model.config.get_text_config())
    geo_full = dataclasses.replace(geo, layers=spec.layers)
    elem = torch.finfo(model.dtype).bits // 8
    base = flops.estimate(model, inputs)[0]
    if layers == spec.layers:  # the run's own schedules are the full depth's
        traces = {m: v[-1]["trace"] for m, v in samples.items() if m != "control"}
        at_full = {m: (flops.estimate(model, inputs, tr)[0] if tr else base).llm_tokens_per_layer
                   for m, tr in traces.items()}
    else:
        log(f"schedules on a {spec.layers}-layer stand-in")
        at_full = schedules_at_full(spec, list(samples), budget)
    t = {m: [s["prefill_s"] for s in v] for m, v in samples.items()}
    d = {m: [s["decode_s"] for s in v] for m, v in samples.items()}
    rows = []
    for m, runs in samples.items():
        trace = runs[-1]["trace"]
        row: dict[str, Any] = {"method": m}
        if m == "control":
            tokens = [float(setup["short"])] * layers
            row["ideal_speedup"] = flops.prefill_macs(geo, base.llm_tokens_per_layer) / flops.prefill_macs(geo, tokens)
            row["ideal_speedup_full"] = None
        else:
            cost = flops.estimate(model, inputs, trace)[0] if trace is not None else base
            tokens = cost.llm_tokens_per_layer
            row["ideal_speedup"] = base.prefill_total / cost.prefill_total
            sched = at_full["fastv" if m in PEERS else m]
            row["tokens_per_layer_full"] = sched
            row["ideal_speedup_full"] = (flops.prefill_macs(geo_full, at_full["none"])
                                         / flops.prefill_macs(geo_full, sched))
            row["realized_budget"] = trace.realized_budget if trace is not None else 1.0
            if m in ("fastv", "pdrop", "feather"):
                row["scoring_macs_pct"] = 100.0 * scoring_macs(geo, m, tokens) / flops.prefill_macs(geo, tokens)
                row["scoring_macs_pct_full"] = (100.0 * scoring_macs(geo_full, m, sched)
                                                / flops.prefill_macs(geo_full, sched))
        row["llm_tokens_per_layer"] = tokens
        row["prefill_s"], row["prefill_s_median"], row["prefill_s_all"] = min(t[m]), statistics.median(t[m]), t[m]
        row["measured_speedup"], row["measured_speedup_median"] = _speed(t["none"], t[m])
        row["prefill_spread"] = _spread(t[m])
        row["noisy"] = max(_spread(t["none"]), row["prefill_spread"]) > NOISY_SPREAD
        row["measured_over_ideal"] = row["measured_speedup"] / row["ideal_speedup"]
        row["measured_over_ideal_median"] = row["measured_speedup_median"] / row["ideal_speedup"]
        # paired within each round (the variants of a round run back to back), then the median over rounds
        row["measured_speedup_paired"] = statistics.median(a / b for a, b in zip(t["none"], t[m]))
        row["measured_over_ideal_paired"] = row["measured_speedup_paired"] / row["ideal_speedup"]
        row["decode_s"], row["decode_s_median"] = min(d[m]), statistics.median(d[m])
        row["decode_speedup"], row["decode_speedup_median"] = _speed(d["none"], d[m])
        cache = base.llm_tokens_per_layer if m == "none" else tokens
        row["decode_ideal_macs"] = flops.decode_macs(geo, base.llm_tokens_per_layer) / flops.decode_macs(geo, cache)
        row["decode_ideal_bytes"] = (_decode_bytes(geo, base.llm_tokens_per_layer, elem)
                                     / _decode_bytes(geo, cache, elem))
        med = {k: statistics.median(s[k] for s in runs) for k in ("overhead_s", "select_s", "rerun_s", "peak_mib")}
        row.update(med)
        row["scoring_s"] = med["select_s"] + med["rerun_s"]
        row["scoring_pct"] = 100.0 * row["scoring_s"] / row["prefill_s_median"]
        row["scoring_net_s"], row["scoring_net_pct"] = row["scoring_s"], row["scoring_pct"]
        if runs[-1]["key_inputs"]:  # PyramidDrop: its layer reuses the kept rows' keys the scoring projected
            row["key_projection"] = kp = saved_projection(model, [s["key_inputs"] for s in runs])
            row["scoring_net_s"] = row["scoring_s"] - kp["saved_s"]
            row["scoring_net_pct"] = 100.0 * row["scoring_net_s"] / row["prefill_s_median"]
        row["overhead_pct"] = 100.0 * med["overhead_s"] / row["prefill_s_median"]
        row["layer_s"] = min(runs, key=lambda s: s["prefill_s"])["layer_s"]
        row["load1"] = [s["load1"] for s in runs]
        rows.append(row)
    by = {r["method"]: r for r in rows}
    if "fastv" in by:
        k = next(st.layer for st in samples["fastv"][-1]["trace"].stages)
        for p in PEERS:
            if p not in by:
                continue
            peer = by[p]
            if p == "fastv[eager]":  # its scoring is inside layer K-1's attention: timed apart, on that input
                log(f"timing layer {k - 1}'s attention eager vs sdpa")
                peer["eager_attention"] = cost = eager_attention_cost(model, inputs, k - 1, setup["repeats"])
                extra = [a["layer_s"][k - 1] - b["layer_s"][k - 1] for a, b in zip(samples[p], samples["fastv"])]
                peer["layer_extra_s_in_situ"] = statistics.median(extra)
                peer["scoring_s"] = peer["select_s"] + cost["extra_s"]
                peer["scoring_pct"] = 100.0 * peer["scoring_s"] / peer["prefill_s_median"]
            peer["kept_equal_to_fastv"] = True  # checked every round (the run stops otherwise)
            peer["scoring_over_ours"] = peer["scoring_s"] / by["fastv"]["scoring_s"]
            peer["prefill_over_ours"], peer["prefill_over_ours_median"] = _speed(t[p], t["fastv"])
            peer["peak_over_ours_mib"] = peer["peak_mib"] - by["fastv"]["peak_mib"]
    loads = [x for r in rows for x in r["load1"]]
    return {
        "benchmark": "speed", "issue": 23, "device": "cpu", "threads": setup["threads"], "dtype": setup["dtype"],
        "attn_implementation": "sdpa", "batch_size": 1, "budget": budget,
        "model": spec.name, "family": spec.family, "method_params": PARAMS.get(spec.family, {}),
        "geometry": {"hidden": spec.hidden, "heads": spec.heads, "kv_heads": spec.kv_heads, "ffn": spec.ffn,
                     "layers": layers, "layers_full": spec.layers, "image_px": spec.image,
                     "visual_tokens": spec.visual_tokens, "prompt_tokens": setup["prompt"],
                     "control_tokens": setup["short"],
                     "shared_weights": setup["shared"],
                     "vision_tower": "one 64-wide CLIP layer" if spec.family == "llava" else
                                     "one 32-wide windowed Qwen2.5-VL block + merger (LLM prefill dominates)"},
        "shared_weights_note": ("every decoder layer is its own module (own hooks, KV-cache slot, pruning schedule) "
                                "holding the same weight tensors: the compute of the full-depth model, the memory "
                                "of one layer; the weights (~0.8-0.9 GB per layer) stream from memory either way"
                                if setup["shared"] else None),
        "warmup": setup["warmup"], "repeats": setup["repeats"], "new_tokens": setup["new_tokens"],
        "gemm_probe_gflops": setup["probe"],
        "memory_method": "peak RSS the prefill adds: VmHWM (reset via /proc/self/clear_refs) minus VmRSS before; "
                         f"glibc mmap threshold fixed at 64 KiB: {setup['mmap_fixed']}",
        "load_average_1min": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
        "targets": {"measured_over_ideal": ">= 0.9", "scoring_pct": "<= 1"},
        "results": rows, "torch": torch.__version__,
    }


def markdown(res: dict[str, Any]) -> str:
    """The result as markdown tables."""
    g = res["geometry"]

    def budget_cell(r):
        return f"{r['realized_budget']:.3f}" if "realized_budget" in r else f"({g['control_tokens']} text tokens)"

    la = res["load_average_1min"]
    lines = [
        f"# Prefill, decode and scoring speed (budget {res['budget']:g})", "",
        f"Random-init {res['family']} model with the LM geometry of {res['model']} (d={g['hidden']}, {g['heads']} "
        f"query / {g['kv_heads']} key-value heads, FFN {g['ffn']}) with **{g['layers']} of {g['layers_full']} layers**"
        + (" (all holding one shared set of weights: the full model's compute, one layer's memory)"
           if g["shared_weights"] else "")
        + f", {g['visual_tokens']} visual tokens ({g['image_px']} px image), {g['prompt_tokens']}-token prompt; "
        f"{res['device']}, {res['threads']} thread(s), {res['dtype']}, {res['attn_implementation']}, batch 1; "
        f"min (median) over {res['repeats']} rounds after {res['warmup']} warm-up, variants interleaved; [paired]: "
        "the unpruned over the variant's time within each round, median over rounds; "
        f"1-min load average during the runs {la['min']:.1f}-{la['max']:.1f} (median {la['median']:.1f}). "
        f"GEMM probe (GFLOP/s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["gemm_probe_gflops"].items()) + ".", "",
        f"| variant | realized budget | prefill s | ideal speed-up (this depth / {g['layers_full']} layers) "
        "| measured speed-up "
        "| measured/ideal (paired) | scoring ms (% of prefill) | hook overhead % | decode ms/token | decode speed-up "
        "(ideal MACs / bytes) | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["results"]:
        ideal_full = f"{r['ideal_speedup_full']:.2f}x" if r.get("ideal_speedup_full") else "-"
        lines.append(
            f"| {r['method']} | {budget_cell(r)} | {r['prefill_s']:.2f} "
            f"({r['prefill_s_median']:.2f}) | {r['ideal_speedup']:.2f}x / {ideal_full} | {r['measured_speedup']:.2f}x "
            f"({r['measured_speedup_median']:.2f}x){'*' if r['noisy'] else ''} | {r['measured_over_ideal']:.2f} "
            f"({r['measured_over_ideal_median']:.2f}) [{r['measured_over_ideal_paired']:.2f}] | "
            f"{r['scoring_s'] * 1e3:.1f} ({r['scoring_pct']:.2f} %) | "
            f"{r['overhead_pct']:.2f} | {r['decode_s'] * 1e3:.0f} ({r['decode_s_median'] * 1e3:.0f}) | "
            f"{r['decode_speedup']:.2f}x ({r['decode_ideal_macs']:.2f}x / {r['decode_ideal_bytes']:.3f}x) | "
            f"{r['peak_mib']:.0f} |")
    if any(r["noisy"] for r in res["results"]):
        lines += ["", f"\\* noisy: the repeats of this variant or of the unpruned model spread by more than "
                      f"{NOISY_SPREAD:.0%} of their median."]
    ours = [r for r in res["results"] if "scoring_macs_pct" in r]
    if ours:
        lines += ["", "Scoring cost of the LLM-stage methods: time inside `select` (gross), net of the work the "
                  "model then skips (PyramidDrop: its layer takes the kept rows' keys the scoring projected; the "
                  "scoring's projection of all rows is timed in the run, the kept rows' share of it back to back "
                  "on the same rows after the rounds, and that share is subtracted), and the MACs scoring adds to "
                  "the pruned prefill (analytic, net of that reuse):", "",
                  "| method | gross ms (% of prefill) | net ms (% of prefill) | key projection in the run: all rows / "
                  "kept rows' share ms "
                  f"| added MACs % (this depth / {g['layers_full']} layers) |",
                  "|---|---|---|---|---|"]
        for r in ours:
            kp = r.get("key_projection")
            kpc = f"{kp['all_s_in_run'] * 1e3:.0f} / {kp['saved_s'] * 1e3:.0f}" if kp else "-"
            lines.append(f"| {r['method']} | {r['scoring_s'] * 1e3:.1f} ({r['scoring_pct']:.2f} %) | "
                         f"{r['scoring_net_s'] * 1e3:.1f} ({r['scoring_net_pct']:.2f} %) | {kpc} | "
                         f"{r['scoring_macs_pct']:.2f} / {r['scoring_macs_pct_full']:.2f} |")
    peers = [r for r in res["results"] if "scoring_over_ours" in r]
    if peers:
        lines += ["", "Peer-style FastV scoring against ours (same model, same kept sets, checked every round). "
                  "Scoring time: ours inside `select`; fastv[rerun] inside its re-run hook plus `select`; fastv[eager] "
                  "its layer's attention run eagerly with weights minus the same attention in sdpa, timed apart on "
                  "that layer's prefill input, plus `select`. Extra peak: the prefill's peak RSS over ours.", "",
                  "| variant | scoring ms | ours ms | scoring ratio | prefill ratio | extra peak MiB | detail |",
                  "|---|---|---|---|---|---|---|"]
        ours = next(r for r in res["results"] if r["method"] == "fastv")
        for r in peers:
            e = r.get("eager_attention")
            detail = (f"attention eager {e['eager_s'] * 1e3:.0f} ms vs sdpa {e['sdpa_s'] * 1e3:.0f} ms, peak "
                      f"+{e['eager_peak_mib']:.0f} vs +{e['sdpa_peak_mib']:.0f} MiB" if e else
                      f"re-run {r['rerun_s'] * 1e3:.0f} ms")
            lines.append(f"| {r['method']} | {r['scoring_s'] * 1e3:.0f} | {ours['scoring_s'] * 1e3:.1f} | "
                         f"{r['scoring_over_ours']:.1f}x | {r['prefill_over_ours']:.2f}x | "
                         f"{r['peak_over_ours_mib']:+.0f} | {detail} |")
    for name, ops in res.get("profile", {}).items():
        lines += ["", f"Top ops, {name} prefill (torch.profiler, self CPU time):", "",
                  "| op | calls | self s | share | GFLOP/s |", "|---|---|---|---|---|"]
        for o in ops:
            rate = f"{o['gflops_per_s']:.1f}" if o["gflops_per_s"] else "-"
            lines.append(f"| {o['op']} | {o['calls']} | {o['self_s']:.2f} | {o['share'] * 100:.1f} % | {rate} |")
    lines += ["", "Per decoder layer (ms, fastest run; includes tokenprune's pre-hooks at that layer):", ""]
    lines += [f"- {r['method']}: " + ", ".join(f"{v * 1e3:.0f}" for v in r["layer_s"]) for r in res["results"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.bench_speed", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="llava", choices=sorted(SPECS), help="LM geometry: LLaVA-1.5-7B or Qwen2.5-VL-7B")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the model's full depth, 32 / 28)")
    p.add_argument("--shared-weights", action="store_true",
                   help="all decoder layers hold one set of weights (full-depth compute in one layer's memory)")
    p.add_argument("--image", type=int, default=0, help="square image side in px (0: 336 LLaVA, 448 Qwen)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods ('none' always runs)")
    p.add_argument("--budget", type=float, default=0.2, help="budget of every method, in (0, 1]")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs every variant once)")
    p.add_argument("--new-tokens", type=int, default=4, help="decode steps timed per run")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype")
    p.add_argument("--no-peers", action="store_true", help="skip the peer-style FastV variants")
    p.add_argument("--no-control", action="store_true", help="skip the unpatched short-prompt control")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler tables")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("evals/results"), help="folder for the JSON and markdown")
    p.add_argument("--stem", default="", help="file name stem (default: bench_speed, bench_speed_<model> for Qwen)")
    a = p.parse_args(argv)
    stem = a.stem or ("bench_speed" if a.model == "llava" else f"bench_speed_{a.model}")
    a.out.mkdir(parents=True, exist_ok=True)
    res = run(a.model, a.layers or None, a.methods.split(","), a.budget, a.warmup, a.repeats, a.new_tokens, a.dtype,
              not a.no_peers, not a.no_control, not a.no_profile, a.shared_weights, threads=a.threads,
              checkpoint=a.out / f"{stem}.partial.json", **({"image": a.image} if a.image else {}))
    (a.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (a.out / f"{stem}.md").write_text(markdown(res))
    (a.out / f"{stem}.partial.json").unlink(missing_ok=True)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
