"""Prefill benchmark: each method at one budget against the unpruned model, side by side in one run.

A randomly initialised LLaVA with LLaVA-1.5-7B's language-model geometry (hidden 4096, 32 heads,
FFN 11008, MHA, 576 visual tokens from a 336-px / patch-14 grid) and fewer decoder layers on CPU
(``--layers``, default 8 of the real model's 32, the README's setting; 1 CPU thread by default). The vision
tower is a 1-layer, 64-wide CLIP with the same 24x24 grid, so the time is the LLM's. Per method it reports:

* ``prefill_s``: fastest of the repeats of ``model(**inputs, logits_to_keep=1)`` (batch 1; on a shared
  CPU the least-disturbed run; the median is kept too), methods measured round-robin (one run of each
  per round) so machine load drifts hit all of them alike; ``prefill_spread`` = (slowest - fastest) / median
  of the repeats, and ``noisy`` when it (or the unpruned model's) exceeds ``evals.results.NOISY_SPREAD``;
* ``ideal_speedup``: unpruned over pruned analytic prefill MACs (:mod:`tokenprune.flops`);
  ``measured_speedup`` and ``measured_over_ideal`` (target >= 0.9);
* ``overhead_s``: time inside tokenprune's hooks (scoring, selection, gathering, mask and position
  slicing; the vision tower's own time excluded), and ``select_s``, the part inside the methods'
  ``select`` (scoring + selection); ``overhead_pct`` of the prefill (target <= 2%).

``python -m evals.bench_prefill --out results/bench_prefill`` writes ``bench_prefill.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import tokenprune
from tokenprune import flops
from tokenprune.methods.base import Method, build

from .results import NOISY_SPREAD

DEFAULT_METHODS = ("random", "uniform", "fastv", "pdrop", "feather")


def build_model(layers: int, hidden: int = 4096, heads: int = 32, ffn: int = 11008, image: int = 336,
                patch: int = 14, vocab: int = 1024, seed: int = 0) -> Any:
    """Random LLaVA with the given LM geometry and a minimal CLIP tower on an ``image/patch`` grid."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                              image_size=image, patch_size=patch, projection_dim=64)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab - 1, vision_feature_layer=-1,
                      vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def make_inputs(model: Any, before: int = 35, after: int = 30, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt: ``before`` text tokens, the image's visual tokens, ``after`` text tokens."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    n_vis = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    text = lambda n: torch.randint(3, cfg.text_config.vocab_size - 1, (n,), generator=g)  # noqa: E731
    ids = torch.cat([torch.tensor([1]), text(before - 1), torch.full((n_vis,), cfg.image_token_id), text(after)])
    pix = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g)
    return {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None], "pixel_values": pix}


class TimedMethod(Method):
    """Wraps a method so the time inside its stages' ``select`` (scoring + selection) is summed."""

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


class HookClock:
    """Time spent in tokenprune's forward pre-hooks: a pre-hook registered *before* the patch (prepended)
    and one *after* it bracket the engine's hooks on each module; the vision tower's time (which the
    pre-LLM hook triggers on the forward path) is subtracted."""

    def __init__(self, model: Any) -> None:
        self.model = model
        core = model.model
        self.modules = [core, *core.language_model.layers]
        self.starts: dict[int, float] = {}
        self.total = 0.0
        self.vision = 0.0
        self.handles = [m.register_forward_pre_hook(self._start(i), prepend=True) for i, m in enumerate(self.modules)]
        self._v0 = 0.0
        self.layer_s = [0.0] * (len(self.modules) - 1)
        self.handles += [m.register_forward_hook(self._layer_end(i)) for i, m in enumerate(self.modules) if i > 0]
        self.handles.append(core.vision_tower.register_forward_pre_hook(self._vstart))
        self.handles.append(core.multi_modal_projector.register_forward_hook(self._vend))

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


def _one(model: Any, inputs: dict[str, torch.Tensor], method: str, budget: float) -> dict[str, Any]:
    """One timed prefill of ``method`` (``none`` = unpruned) with its hook and select times."""
    clock = HookClock(model)
    timed = None
    handle = None
    try:
        if method != "none":
            timed = TimedMethod(build(method))
            handle = tokenprune.patch(model, timed, budget=budget)
        clock.close_bracket()
        clock.reset()
        with torch.no_grad():
            t0 = time.perf_counter()
            model(**inputs, logits_to_keep=1, use_cache=True)
            dt = time.perf_counter() - t0
        trace = handle.trace if handle is not None else None
        return {"prefill_s": dt, "overhead_s": clock.overhead if handle is not None else 0.0,
                "select_s": timed.elapsed if timed else 0.0, "trace": trace, "layer_s": list(clock.layer_s)}
    finally:
        if handle is not None:
            handle.remove()
        clock.remove()


def run(layers: int = 8, methods: list[str] | None = None, budget: float = 0.2, warmup: int = 1, repeats: int = 3,
        hidden: int = 4096, heads: int = 32, ffn: int = 11008, image: int = 336, patch: int = 14,
        threads: int | None = None, log: Any = print) -> dict[str, Any]:
    """Run the benchmark and return the result object (see the module docstring)."""
    if threads:
        torch.set_num_threads(threads)
    registered = tokenprune.methods()
    methods = [m for m in (methods or DEFAULT_METHODS) if m in registered]
    t0 = time.perf_counter()
    model = build_model(layers, hidden, heads, ffn, image, patch)
    inputs = make_inputs(model)
    log(f"built model in {time.perf_counter() - t0:.1f} s; prompt {inputs['input_ids'].shape[1]} tokens")
    names = ["none", *methods]
    samples: dict[str, list[dict[str, Any]]] = {m: [] for m in names}
    errors: dict[str, str] = {}
    for r in range(warmup + repeats):
        for m in names:
            if m in errors:
                continue
            try:
                res = _one(model, inputs, m, budget)
            except Exception as e:  # noqa: BLE001 - report, keep benchmarking the others
                errors[m] = f"{type(e).__name__}: {e}"
                continue
            if r >= warmup:
                samples[m].append(res)
            log(f"round {r} {m}: {res['prefill_s']:.3f} s")
    base_cost = flops.estimate(model, inputs)[0]
    rows = []
    base_t = min(s["prefill_s"] for s in samples["none"])
    base_med = statistics.median(s["prefill_s"] for s in samples["none"])
    base_spread = _spread([s["prefill_s"] for s in samples["none"]])
    for m in names:
        if m in errors or not samples[m]:
            rows.append({"method": m, "error": errors.get(m, "no samples")})
            continue
        trace = samples[m][-1]["trace"]
        cost = flops.estimate(model, inputs, trace)[0]
        t = min(s["prefill_s"] for s in samples[m])
        t_med = statistics.median(s["prefill_s"] for s in samples[m])
        ideal = base_cost.prefill_total / cost.prefill_total
        over = statistics.median(s["overhead_s"] for s in samples[m])
        rows.append({
            "method": m, "budget": None if m == "none" else budget,
            "realized_budget": trace.realized_budget if trace is not None else 1.0,
            "visual_tokens_per_layer": trace.visual_tokens_per_layer if trace is not None else None,
            "prefill_s": t, "prefill_s_median": t_med, "prefill_s_all": [s["prefill_s"] for s in samples[m]],
            "measured_speedup_median": base_med / t_med,
            "prefill_spread": _spread([s["prefill_s"] for s in samples[m]]),
            "noisy": max(base_spread, _spread([s["prefill_s"] for s in samples[m]])) > NOISY_SPREAD,
            "prefill_gmacs": cost.prefill_total / 1e9, "flops_ratio": cost.prefill_total / base_cost.prefill_total,
            "ideal_speedup": ideal, "measured_speedup": base_t / t, "measured_over_ideal": (base_t / t) / ideal,
            "overhead_s": over, "select_s": statistics.median(s["select_s"] for s in samples[m]),
            "overhead_pct": 100.0 * over / t,
            "layer_s": min(samples[m], key=lambda s: s["prefill_s"])["layer_s"],
        })
    return {
        "benchmark": "prefill", "device": "cpu", "threads": torch.get_num_threads(), "dtype": "float32",
        "attn_implementation": "sdpa", "batch_size": 1,
        "geometry": {"hidden": hidden, "heads": heads, "ffn": ffn, "layers": layers, "layers_llava_1_5_7b": 32,
                     "visual_tokens": (image // patch) ** 2, "prompt_tokens": int(inputs["input_ids"].shape[1]),
                     "vision_tower": "1-layer 64-wide CLIP (LLM prefill dominates)"},
        "budget": budget, "warmup": warmup, "repeats": repeats, "targets": {"measured_over_ideal": ">= 0.9",
                                                                           "overhead_pct": "<= 2"},
        "results": rows, "wall_s": time.perf_counter() - t0,
        "torch": torch.__version__,
    }


def _spread(times: list[float]) -> float:
    """(slowest - fastest) / median of repeated timings."""
    return (max(times) - min(times)) / statistics.median(times)


def markdown(res: dict[str, Any]) -> str:
    """The result as a markdown table."""
    g = res["geometry"]
    lines = [
        f"# Prefill benchmark (budget {res['budget']:g})", "",
        f"Random-init LLaVA, LM geometry of LLaVA-1.5-7B (d={g['hidden']}, {g['heads']} heads, FFN {g['ffn']}) with "
        f"**{g['layers']} of 32 layers**, {g['visual_tokens']} visual tokens, {g['prompt_tokens']}-token prompt; "
        f"{res['device']}, {res['threads']} threads, {res['dtype']}, {res['attn_implementation']}, batch 1; "
        f"best of {res['repeats']} (after {res['warmup']} warm-up; median-based speed-up in brackets), "
        "methods interleaved.", "",
        "| method | realized budget | prefill s (min / median) | spread | FLOPs ratio | ideal speed-up "
        "| measured speed-up | measured/ideal | hook overhead ms | select ms | overhead % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["results"]:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error'][:80]} |")
            continue
        lines.append(
            f"| {r['method']} | {r['realized_budget']:.3f} | {r['prefill_s']:.3f} / {r['prefill_s_median']:.3f} | "
            f"{r['prefill_spread']:.0%} | {r['flops_ratio']:.3f} | {r['ideal_speedup']:.2f}x | "
            f"{r['measured_speedup']:.2f}x ({r['measured_speedup_median']:.2f}x){'*' if r['noisy'] else ''} | "
            f"{r['measured_over_ideal']:.2f} | "
            f"{r['overhead_s'] * 1e3:.1f} | {r['select_s'] * 1e3:.1f} | {r['overhead_pct']:.2f} |")
    if any(r.get("noisy") for r in res["results"]):
        lines += ["", f"\\* noisy: the repeats of this method or of the unpruned model spread by more than "
                      f"{NOISY_SPREAD:.0%} of their median; do not quote this speed-up."]
    lines += ["", "Per decoder layer (ms, fastest run; includes tokenprune's pre-hooks at that layer):", ""]
    for r in res["results"]:
        if "layer_s" in r:
            lines.append(f"- {r['method']}: " + ", ".join(f"{v * 1e3:.0f}" for v in r["layer_s"]))
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    """The command line's options (defaults: the README's setting)."""
    p = argparse.ArgumentParser(prog="python -m evals.bench_prefill", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="decoder layers (LLaVA-1.5-7B has 32; the README uses 8)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods ('none' always runs)")
    p.add_argument("--budget", type=float, default=0.2, help="budget of every method, in (0, 1]")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each times every method once)")
    p.add_argument("--hidden", type=int, default=4096, help="LM hidden size (LLaVA-1.5-7B: 4096)")
    p.add_argument("--heads", type=int, default=32, help="attention heads (LLaVA-1.5-7B: 32)")
    p.add_argument("--ffn", type=int, default=11008, help="MLP width (LLaVA-1.5-7B: 11008)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default; on a shared 2-core machine 1 is the steadiest)")
    p.add_argument("--out", type=Path, default=Path("results/bench_prefill"), help="folder for the JSON and markdown")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    res = run(a.layers, a.methods.split(","), a.budget, a.warmup, a.repeats, a.hidden, a.heads, a.ffn,
              threads=a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_prefill.json").write_text(json.dumps(res, indent=1))
    (a.out / "bench_prefill.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
