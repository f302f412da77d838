"""Latency, batch size 1: vision encode, prefill (time to first token), decode tokens/s, end to end,
peak memory and KV-cache bytes. Warm-up runs, then the median of repeats; CUDA is synchronised
around every timed region.

* ``vision_s``: vision tower + projector (forward hooks on both, inside the prefill).
* ``prefill_s``: one forward over the prompt with a cache (logits of the last token only) = TTFT,
  including vision and pruning.
* ``e2e_s``: ``generate`` with exactly ``new_tokens`` tokens (``min_new_tokens`` forced).
* ``decode_tokens_per_s``: ``(new_tokens - 1) / (e2e_s - prefill_s)``.
* ``kv_cache_bytes``: bytes of keys and values in the cache the prefill leaves (pruning-aware).
* ``peak_memory_bytes``: ``torch.cuda.max_memory_allocated`` during one generate (None on CPU).
* ``prefill_s_min``: the fastest repeat (median over docs); ``prefill_spread``: (slowest - fastest) / median
  of a doc's repeats (median over docs); above ``evals.results.NOISY_SPREAD`` the timing is noise-dominated.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from tokenprune.core.state import cache_of

from .models import model_inputs


def sync(device: str) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def cache_bytes(cache: Any) -> int:
    """Bytes held by the keys and values of a transformers cache (0 for None)."""
    if cache is None:
        return 0
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for k, v in cache:  # legacy tuple caches
        total += k.numel() * k.element_size() + v.numel() * v.element_size()
    return total


class _VisionTimer:
    """Times vision tower + projector with forward hooks (first tower call to last projector return)."""

    def __init__(self, model: Any, device: str) -> None:
        core = getattr(model, "model", model)
        self.device = device
        self.start: float | None = None
        self.elapsed = 0.0
        self.handles = []
        tower, proj = getattr(core, "vision_tower", None), getattr(core, "multi_modal_projector", None)
        if tower is not None and proj is not None:
            self.handles.append(tower.register_forward_pre_hook(self._pre))
            self.handles.append(proj.register_forward_hook(self._post))

    def _pre(self, *_):
        sync(self.device)
        self.start = time.perf_counter()

    def _post(self, *_):
        sync(self.device)
        if self.start is not None:
            self.elapsed += time.perf_counter() - self.start
            self.start = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _timed(fn, device: str) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def measure(model: Any, processor: Any, docs: list[dict[str, Any]], new_tokens: int, device: str = "cpu",
            dtype: torch.dtype | None = None, warmup: int = 1, repeats: int = 3,
            prompt_style: str = "auto") -> dict[str, Any]:
    """Median latencies over ``docs`` (each: ``warmup`` untimed runs, then the median of ``repeats``)."""
    tok = getattr(processor, "tokenizer", processor)
    per_doc: dict[str, list[float]] = {k: [] for k in ("vision_s", "prefill_s", "e2e_s", "decode_tokens_per_s",
                                                       "prefill_s_min", "prefill_spread")}
    kv, peak = [], []
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    gen_kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tok.pad_token_id)
    for doc in docs:
        inputs = model_inputs(processor, [doc], device, dtype, prompt_style)
        timer = _VisionTimer(model, device)
        try:
            with torch.no_grad():
                for _ in range(warmup):
                    model(**inputs, use_cache=True, logits_to_keep=1)
                    model.generate(**inputs, **gen_kw)
                vis, pre, e2e = [], [], []
                for _ in range(repeats):
                    timer.elapsed = 0.0
                    t, out = _timed(lambda x=inputs: model(**x, use_cache=True, logits_to_keep=1), device)
                    pre.append(t)
                    vis.append(timer.elapsed)
                    kv_b = cache_bytes(cache_of(out))  # `cache` from transformers 5.24
                    del out
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    t, _ = _timed(lambda x=inputs: model.generate(**x, **gen_kw), device)
                    e2e.append(t)
                    if cuda:
                        peak.append(torch.cuda.max_memory_allocated())
        finally:
            timer.remove()
        p, e = statistics.median(pre), statistics.median(e2e)
        per_doc["vision_s"].append(statistics.median(vis))
        per_doc["prefill_s"].append(p)
        per_doc["prefill_s_min"].append(min(pre))
        per_doc["prefill_spread"].append((max(pre) - min(pre)) / p if p > 0 else 0.0)
        per_doc["e2e_s"].append(e)
        per_doc["decode_tokens_per_s"].append((new_tokens - 1) / (e - p) if new_tokens > 1 and e > p else float("nan"))
        kv.append(kv_b)
    out = {k: statistics.median(v) if v else None for k, v in per_doc.items()}
    out.update({
        "kv_cache_bytes": statistics.median(kv) if kv else None,
        "peak_memory_bytes": max(peak) if peak else None,
        "samples": len(docs), "warmup": warmup, "repeats": repeats, "new_tokens": new_tokens,
        "batch_size": 1, "device": str(device),
    })
    return out
