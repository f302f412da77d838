"""Prefill and decode speed of every method at one budget, and FastV's scoring against the way the
official code and LightCompress obtain it, side by side in one run (issue #23).

The model is :func:`evals.bench_prefill.build_model`: a random LLaVA with LLaVA-1.5-7B's language
model (hidden 4096, 32 heads, FFN 11008, 576 visual tokens, a 641-token prompt) and ``--layers`` of
its 32 decoder layers, in ``--dtype`` (float32 by default: CPUs without bf16 instructions, such as
this AVX2 one, run bf16 matmuls several times slower than float32; ``gemm_probe`` in the JSON
records both rates). Variants, measured round-robin (one run of each per round, so load drifts hit
all of them alike), each through one greedy ``generate`` call of ``--new-tokens`` + 1 tokens:

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
and, from each method's schedule on a 32-layer decoder (a narrow 32-layer stand-in with the same
prompt gives the token counts), at LLaVA-1.5-7B's 32 layers. A torch.profiler table of the top ops
of the unpruned and the random-pruned prefill closes the run.

``python -m evals.bench_speed --out evals/results`` writes ``bench_speed.json`` and ``.md``.
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
from transformers import LogitsProcessor, LogitsProcessorList

import tokenprune
from tokenprune import flops
from tokenprune.core.select import keep_counts
from tokenprune.methods.base import Method, build
from tokenprune.methods.fastv import FastV

from .bench_prefill import HookClock, TimedMethod, _spread, build_model, make_inputs
from .results import NOISY_SPREAD

DEFAULT_METHODS = ("random", "uniform", "fastv", "pdrop", "feather")
PEERS = ("fastv[rerun]", "fastv[eager]")
LLM_STAGE_METHODS = ("fastv", "pdrop", "feather", *PEERS)


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


class Timed(TimedMethod):
    """:class:`TimedMethod` that also installs the inner method's own hooks."""

    def install(self, anatomy, hooks, state) -> None:
        self.inner.install(anatomy, hooks, state)


def _method(variant: str) -> Method:
    if variant in PEERS:
        return PeerFastV(mode=variant[len("fastv["):-1])
    return build(variant)


# ----------------------------------------------------------------------------- one timed run


class Stamps(LogitsProcessor):
    """Records when each token's logits are ready, and the hook clocks and peak memory at the first
    (the end of the prefill)."""

    def __init__(self, clock: HookClock, timed: Timed | None) -> None:
        self.clock, self.timed, self.times, self.at_prefill = clock, timed, [], {}

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        if len(self.times) == 1:
            self.at_prefill = {
                "overhead_s": self.clock.overhead, "select_s": self.timed.elapsed if self.timed else 0.0,
                "layer_s": list(self.clock.layer_s), "hwm_kib": _status_kib("VmHWM"),
            }
        return scores


def _one(model, inputs, variant: str, budget: float, new_tokens: int) -> dict[str, Any]:
    """One ``generate`` of ``variant`` (``none`` / ``control`` unpatched)."""
    clock = HookClock(model)
    timed = handle = None
    try:
        if variant not in ("none", "control"):
            timed = Timed(_method(variant))
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
        }
    finally:
        if handle is not None:
            handle.remove()
        clock.remove()


# ----------------------------------------------------------------------------- analytic ideals


def _geometry_7b(layers: int, hidden: int, heads: int, ffn: int) -> flops.DecoderGeometry:
    return flops.DecoderGeometry(hidden=hidden, ffn=ffn, heads=heads, kv_heads=heads, head_dim=hidden // heads,
                                 layers=layers)


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


def schedules_at_32(variants: list[str], budget: float, image: int, patch: int) -> dict[str, list[float]]:
    """Tokens entering each of 32 decoder layers for each variant: the methods run once on a narrow
    32-layer stand-in with the benchmark's prompt (only the schedule matters, not the width)."""
    stand_in = build_model(32, hidden=64, heads=4, ffn=128, image=image, patch=patch)
    inputs = make_inputs(stand_in)
    out = {"none": flops.estimate(stand_in, inputs)[0].llm_tokens_per_layer}
    for v in variants:
        if v in (*PEERS, "none", "control"):
            continue
        with tokenprune.patch(stand_in, v, budget=budget) as handle, torch.no_grad():
            stand_in(**inputs, logits_to_keep=1)
            out[v] = flops.estimate(stand_in, inputs, handle.trace)[0].llm_tokens_per_layer
    return out


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


def run(layers: int = 8, methods: list[str] | None = None, budget: float = 0.2, warmup: int = 1, repeats: int = 3,
        new_tokens: int = 4, dtype: str = "float32", peers: bool = True, control: bool = True, profile: bool = True,
        hidden: int = 4096, heads: int = 32, ffn: int = 11008, image: int = 336, patch: int = 14,
        threads: int | None = 1, log: Any = print) -> dict[str, Any]:
    """Run the benchmark and return the result object (see the module docstring)."""
    if threads:
        torch.set_num_threads(threads)
    mmap_fixed = _fix_mmap_threshold()
    t_start = time.perf_counter()
    probe = gemm_probe(width=hidden)
    model = build_model(layers, hidden, heads, ffn, image, patch).to(getattr(torch, dtype))
    inputs = make_inputs(model)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    n_vis = (image // patch) ** 2
    prompt = int(inputs["input_ids"].shape[1])
    short = prompt - n_vis + int(keep_counts(torch.tensor([n_vis]), budget)[0])
    text_only = {"input_ids": torch.randint(3, 1000, (1, short), generator=torch.Generator().manual_seed(1)),
                 "attention_mask": torch.ones(1, short, dtype=torch.long)}
    log(f"built {layers}-layer {dtype} model in {time.perf_counter() - t_start:.1f} s; prompt {prompt} tokens; "
        f"control {short} tokens; gemm {probe}")
    registered = tokenprune.methods()
    names = ["none", *[m for m in (methods or DEFAULT_METHODS) if m in registered]]
    names += [p for p in PEERS if peers and "fastv" in names]
    names += ["control"] if control else []
    samples: dict[str, list[dict[str, Any]]] = {m: [] for m in names}
    for r in range(warmup + repeats):
        kept = {}
        for m in names:
            res = _one(model, text_only if m == "control" else inputs, m, budget, new_tokens)
            if r >= warmup:
                samples[m].append(res)
            if res["trace"] is not None:
                kept[m] = [st.kept for st in res["trace"].stages]
            log(f"round {r} {m}: prefill {res['prefill_s']:.3f} s, decode {res['decode_s'] * 1e3:.0f} ms/token, "
                f"select {res['select_s'] * 1e3:.1f} ms, peak +{res['peak_mib']:.0f} MiB, load {res['load1']:.1f}")
        for p in PEERS:  # the peers' scores must select exactly our kept set
            if p in kept and not all(torch.equal(a, b) for a, b in zip(kept[p], kept["fastv"], strict=True)):
                raise AssertionError(f"round {r}: {p} kept {kept[p]}, fastv kept {kept['fastv']}")
    setup = dict(layers=layers, hidden=hidden, heads=heads, ffn=ffn, image=image, patch=patch, dtype=dtype,
                 threads=torch.get_num_threads(), budget=budget, warmup=warmup, repeats=repeats,
                 new_tokens=new_tokens, prompt=prompt, short=short, probe=probe, mmap_fixed=mmap_fixed)
    res = summarise(model, inputs, samples, setup, log)
    if profile:
        log("profiling the unpruned and the random-pruned prefill")
        res["profile"] = {"none": profile_ops(model, inputs, None, budget),
                          "random": profile_ops(model, inputs, "random", budget)}
    res["wall_s"] = time.perf_counter() - t_start
    return res


def _speed(base: list[float], mine: list[float]) -> tuple[float, float]:
    """Speed-ups (base over mine) from the minima and from the medians."""
    return min(base) / min(mine), statistics.median(base) / statistics.median(mine)


def summarise(model, inputs, samples: dict[str, list[dict[str, Any]]], setup: dict[str, Any], log: Any = print):
    """The result object: one row per variant, with the ideals at this depth and at 32 layers."""
    layers, budget = setup["layers"], setup["budget"]
    geo = _geometry_7b(layers, setup["hidden"], setup["heads"], setup["ffn"])
    geo32 = dataclasses.replace(geo, layers=32)
    elem = torch.finfo(model.dtype).bits // 8
    log("schedules on a 32-layer stand-in")
    at32 = schedules_at_32(list(samples), budget, setup["image"], setup["patch"])
    base = flops.estimate(model, inputs)[0]
    t = {m: [s["prefill_s"] for s in v] for m, v in samples.items()}
    d = {m: [s["decode_s"] for s in v] for m, v in samples.items()}
    rows = []
    for m, runs in samples.items():
        trace = runs[-1]["trace"]
        row: dict[str, Any] = {"method": m}
        if m == "control":
            tokens = [float(setup["short"])] * layers
            row["ideal_speedup"] = flops.prefill_macs(geo, base.llm_tokens_per_layer) / flops.prefill_macs(geo, tokens)
            row["ideal_speedup_32"] = None
        else:
            cost = flops.estimate(model, inputs, trace)[0] if trace is not None else base
            tokens = cost.llm_tokens_per_layer
            row["ideal_speedup"] = base.prefill_total / cost.prefill_total
            sched = at32["fastv" if m in PEERS else m]
            row["tokens_per_layer_32"] = sched
            row["ideal_speedup_32"] = flops.prefill_macs(geo32, at32["none"]) / flops.prefill_macs(geo32, sched)
            row["realized_budget"] = trace.realized_budget if trace is not None else 1.0
            if m in ("fastv", "pdrop", "feather"):
                row["scoring_macs_pct"] = 100.0 * scoring_macs(geo, m, tokens) / flops.prefill_macs(geo, tokens)
                row["scoring_macs_pct_32"] = 100.0 * scoring_macs(geo32, m, sched) / flops.prefill_macs(geo32, sched)
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
        "geometry": {"hidden": setup["hidden"], "heads": setup["heads"], "ffn": setup["ffn"], "layers": layers,
                     "layers_llava_1_5_7b": 32, "visual_tokens": (setup["image"] // setup["patch"]) ** 2,
                     "prompt_tokens": setup["prompt"], "control_tokens": setup["short"],
                     "vision_tower": "1-layer 64-wide CLIP (LLM prefill dominates)"},
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
        f"Random-init LLaVA, LM geometry of LLaVA-1.5-7B (d={g['hidden']}, {g['heads']} heads, FFN {g['ffn']}) with "
        f"**{g['layers']} of 32 layers**, {g['visual_tokens']} visual tokens, {g['prompt_tokens']}-token prompt; "
        f"{res['device']}, {res['threads']} thread(s), {res['dtype']}, {res['attn_implementation']}, batch 1; "
        f"min (median) over {res['repeats']} rounds after {res['warmup']} warm-up, variants interleaved; [paired]: "
        "the unpruned over the variant's time within each round, median over rounds; "
        f"1-min load average during the runs {la['min']:.1f}-{la['max']:.1f} (median {la['median']:.1f}). "
        f"GEMM probe (GFLOP/s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["gemm_probe_gflops"].items()) + ".", "",
        "| variant | realized budget | prefill s | ideal speed-up (this depth / 32 layers) | measured speed-up "
        "| measured/ideal (paired) | scoring ms (% of prefill) | hook overhead % | decode ms/token | decode speed-up "
        "(ideal MACs / bytes) | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["results"]:
        ideal32 = f"{r['ideal_speedup_32']:.2f}x" if r.get("ideal_speedup_32") else "-"
        lines.append(
            f"| {r['method']} | {budget_cell(r)} | {r['prefill_s']:.2f} "
            f"({r['prefill_s_median']:.2f}) | {r['ideal_speedup']:.2f}x / {ideal32} | {r['measured_speedup']:.2f}x "
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
        lines += ["", "Scoring cost of the LLM-stage methods: measured time inside `select` (for PyramidDrop this "
                  "includes projecting the keys its layer then reuses) and the MACs scoring adds to the pruned "
                  "prefill (analytic, net of that reuse):", "",
                  "| method | scoring ms | % of prefill (measured) | added MACs % (this depth) | (32 layers) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['scoring_s'] * 1e3:.1f} | {r['scoring_pct']:.2f} | "
                  f"{r['scoring_macs_pct']:.2f} | {r['scoring_macs_pct_32']:.2f} |" for r in ours]
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
    p = argparse.ArgumentParser(prog="python -m evals.bench_speed", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8, help="decoder layers (LLaVA-1.5-7B has 32; default 8)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=4, help="decode steps timed per run")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--no-peers", action="store_true", help="skip the peer-style FastV variants")
    p.add_argument("--no-control", action="store_true", help="skip the unpatched short-prompt control")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("evals/results"))
    a = p.parse_args(argv)
    res = run(a.layers, a.methods.split(","), a.budget, a.warmup, a.repeats, a.new_tokens, a.dtype,
              not a.no_peers, not a.no_control, not a.no_profile, a.hidden, a.heads, a.ffn, threads=a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_speed.json").write_text(json.dumps(res, indent=1))
    (a.out / "bench_speed.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
