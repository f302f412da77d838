"""LLM.int8() (bitsandbytes) with and without token reduction on CPU: accuracy, bytes, prefill latency,
memory (issue #7). Writes ``OUT.json`` and ``OUT.md``.

* **bytes**: the converted linears' weights as stored (int8 codes + float32 row scales) over the same
  weights in fp16, measured from the tensors; plus whole-model tensor bytes per variant.
* **accuracy** (needs the trained LLaVA fixture): shapes test split, greedy, ``tokenprune.demo.score``;
  fp32 vs int8 (``quantize_int8`` defaults: language model only, threshold 6.0), unpruned and with
  ``--method`` at ``--budget`` (PyramidDrop ``pdrop`` at 0.2 by default; FastV if pdrop is not
  registered). Also the share of identical predictions.
* **latency**: prefill (one forward over prompt + image with a cache, last-token logits; vision and
  pruning included), batch 1, fp32 / bf16 / int8 x unpruned / pruned, **interleaved round-robin in one
  process** so the ratios are side by side; median of ``--repeats``. Run on the fixture (when present)
  and on a larger random-weight LLaVA (``--synthetic-hidden``) where the linears dominate.
* **memory**: one fresh subprocess per variant: resident set after loading (and converting), and the
  peak resident-set growth during one prefill (``VmHWM`` reset through ``/proc/self/clear_refs``).

``python evals/bench_int8.py --out results/bench_int8``   (``--checkpoint runs/llava/final`` to
use a training output instead of the bundled fixture; ``--skip-accuracy`` without a fixture.)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tokenprune  # noqa: E402
from tokenprune.demo import load, prompt, score, shapes  # noqa: E402
from tokenprune.demo.generator import KINDS  # noqa: E402
from tokenprune.quant import is_int8, weight_bytes  # noqa: E402

VARIANTS = ("fp32", "bf16", "int8")


# ------------------------------------------------------------------------------------------ models


def fixture_available(checkpoint: str | None) -> bool:
    from tokenprune.demo import checkpoint_path

    path = Path(checkpoint) if checkpoint else checkpoint_path("llava")
    return (path / "config.json").is_file()


def load_source(source: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """fp32 ``(model, processor)`` of ``"fixture"`` or ``"synthetic"`` (random weights, seeded)."""
    if source == "fixture":
        model, proc = load("llava", path=args.checkpoint) if args.checkpoint else load("llava")
    else:
        from transformers import LlavaForConditionalGeneration

        from tokenprune.demo import build

        tok = build.build_tokenizer()
        torch.manual_seed(0)
        cfg = build.llava_config(tok, layers=args.synthetic_layers, hidden=args.synthetic_hidden,
                                 ffn=args.synthetic_ffn)
        model, proc = LlavaForConditionalGeneration(cfg), build.llava_processor(tok)
    model.set_attn_implementation("sdpa")
    proc.tokenizer.padding_side = "left"
    return model.eval(), proc


def make_variant(model: Any, variant: str) -> Any:
    if variant == "bf16":
        return model.to(torch.bfloat16)
    if variant == "int8":
        tokenprune.quantize_int8(model)
    return model


def tensor_bytes(model: Any) -> dict[str, Any]:
    """Bytes of every parameter and buffer as stored (int8 layers: codes + scales + bias), and the
    converted linears' weights against the same weights in fp16."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    int8_layers = [m for m in model.modules() if is_int8(m)]
    total += sum(weight_bytes(m) - m.weight.numel() * m.weight.element_size() for m in int8_layers)  # + scales
    out: dict[str, Any] = {"model_bytes": total, "int8_layers": len(int8_layers)}
    if int8_layers:
        stored = sum(weight_bytes(m) for m in int8_layers)
        fp16 = sum(2 * m.in_features * m.out_features for m in int8_layers)
        out.update(int8_linear_weight_bytes=stored, same_weights_fp16_bytes=fp16, ratio_vs_fp16=stored / fp16)
    return out


# ---------------------------------------------------------------------------------------- accuracy


@torch.no_grad()
def evaluate(model: Any, proc: Any, examples: list[dict], method: str | None, budget: float, bs: int,
             max_new: int) -> dict[str, Any]:
    tok = proc.tokenizer
    per_kind: dict[str, list[float]] = defaultdict(list)
    preds: list[str] = []
    ctx = tokenprune.patch(model, method, budget=budget) if method else contextlib.nullcontext()
    t0 = time.perf_counter()
    with ctx:
        for i in range(0, len(examples), bs):
            chunk = examples[i:i + bs]
            inputs = proc(images=[ex["image"] for ex in chunk], text=[prompt(ex["question"]) for ex in chunk],
                          return_tensors="pt", padding=True)
            gen = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
            for ex, g in zip(chunk, gen, strict=True):
                text = tok.decode(g[inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                preds.append(text)
                per_kind[ex["kind"]].append(score(ex["kind"], text, ex))
    flat = [s for v in per_kind.values() for s in v]
    return {
        "accuracy": round(100 * sum(flat) / len(flat), 2),
        "per_kind": {k: round(100 * sum(per_kind[k]) / len(per_kind[k]), 1) for k in KINDS if per_kind[k]},
        "seconds": round(time.perf_counter() - t0, 1),
        "predictions": preds,
    }


def accuracy_section(args: argparse.Namespace, method: str) -> dict[str, Any]:
    examples = shapes(split="test", n=args.n)
    rows: dict[str, Any] = {}
    for variant in ("fp32", "int8"):
        model, proc = load_source("fixture", args)
        model = make_variant(model, variant)
        for pruning in ("unpruned", method):
            key = f"{variant}/{pruning}"
            print(f"[accuracy] {key} on {len(examples)} examples ...", flush=True)
            rows[key] = evaluate(model, proc, examples, None if pruning == "unpruned" else method, args.budget,
                                 args.bs, args.max_new_tokens)
            print(f"[accuracy] {key}: {rows[key]['accuracy']} ({rows[key]['seconds']} s)", flush=True)
        del model
        gc.collect()
    out: dict[str, Any] = {"n": len(examples), "method": method, "budget": args.budget, "rows": {}, "deltas": {}}
    for key, r in rows.items():
        out["rows"][key] = {k: v for k, v in r.items() if k != "predictions"}
    for pruning in ("unpruned", method):
        a, b = rows[f"fp32/{pruning}"], rows[f"int8/{pruning}"]
        same = sum(x.strip() == y.strip() for x, y in zip(a["predictions"], b["predictions"], strict=True))
        out["deltas"][pruning] = {
            "int8_minus_fp32_points": round(b["accuracy"] - a["accuracy"], 2),
            "identical_predictions": round(same / len(a["predictions"]), 4),
        }
    out["within_1_point"] = all(abs(d["int8_minus_fp32_points"]) <= 1.0 for d in out["deltas"].values())
    return out


# ----------------------------------------------------------------------------------------- latency


def latency_inputs(proc: Any) -> dict[str, torch.Tensor]:
    ex = shapes(split="test", n=1)[0]
    return proc(images=[ex["image"]], text=[prompt(ex["question"])], return_tensors="pt")


def prefill(model: Any, inputs: dict[str, torch.Tensor]) -> float:
    t0 = time.perf_counter()
    model(**inputs, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0


@torch.no_grad()
def latency_section(source: str, args: argparse.Namespace, method: str) -> dict[str, Any]:
    models, bytes_ = {}, {}
    for variant in VARIANTS:
        model, proc = load_source(source, args)
        models[variant] = make_variant(model, variant)
        bytes_[variant] = tensor_bytes(models[variant])
    inputs = latency_inputs(proc)
    configs = [(v, p) for v in VARIANTS for p in ("unpruned", method)]
    times: dict[tuple[str, str], list[float]] = {c: [] for c in configs}

    def run(cfg: tuple[str, str], timed: bool) -> None:
        v, p = cfg
        model = models[v]
        x = dict(inputs)
        if v == "bf16":
            x["pixel_values"] = x["pixel_values"].to(torch.bfloat16)
        ctx = tokenprune.patch(model, p, budget=args.budget) if p != "unpruned" else contextlib.nullcontext()
        with ctx:
            t = prefill(model, x)
        if timed:
            times[cfg].append(t)

    for _ in range(args.warmup):
        for cfg in configs:
            run(cfg, False)
    for r in range(args.repeats):  # round-robin: every config sees the same machine conditions
        for cfg in configs[r % len(configs):] + configs[:r % len(configs)]:
            run(cfg, True)
    med = {c: statistics.median(ts) for c, ts in times.items()}
    rows = {}
    for v, p in configs:
        rows[f"{v}/{p}"] = {
            "prefill_ms": round(1000 * med[(v, p)], 2),
            "iqr_ms": round(1000 * (_q(times[(v, p)], 0.75) - _q(times[(v, p)], 0.25)), 2),
            "vs_fp32_same_pruning": round(med[(v, p)] / med[("fp32", p)], 3),
            "vs_fp32_unpruned": round(med[(v, p)] / med[("fp32", "unpruned")], 3),
        }
    cfg = models["fp32"].config.text_config
    return {
        "source": source,
        "model": {"llm_layers": cfg.num_hidden_layers, "llm_hidden": cfg.hidden_size, "llm_ffn": cfg.intermediate_size,
                  "prompt_tokens": int(inputs["input_ids"].shape[1])},
        "rows": rows,
        "bytes": bytes_,
    }


def _q(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


# ------------------------------------------------------------------------------------------ memory


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


@torch.no_grad()
def memory_child(source: str, variant: str, pruning: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a fresh process: RSS after load + convert, peak RSS growth during one prefill."""
    import ctypes

    import bitsandbytes  # noqa: F401  (loaded in every variant, so its libraries are not counted as model memory)

    base = _status_kb("VmRSS")  # libraries imported, no model yet
    model, proc = load_source(source, args)
    model = make_variant(model, variant)
    inputs = latency_inputs(proc)
    if variant == "bf16":
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    ctx = tokenprune.patch(model, pruning, budget=args.budget) if pruning != "unpruned" else contextlib.nullcontext()
    with ctx:
        model(**inputs, use_cache=True, logits_to_keep=1)  # warm-up (lazy inits, bitsandbytes state)
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed fp32 weights back before measuring
        rss = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        model(**inputs, use_cache=True, logits_to_keep=1)
        peak = _status_kb("VmHWM")
    return {"rss_before_load_mb": round(base / 1024, 1), "rss_after_load_mb": round(rss / 1024, 1),
            "model_rss_mb": round((rss - base) / 1024, 1), "prefill_peak_growth_mb": round((peak - rss) / 1024, 1)}


def memory_section(source: str, args: argparse.Namespace, method: str) -> dict[str, Any]:
    rows = {}
    for variant in VARIANTS:
        for pruning in ("unpruned", method):
            cmd = [sys.executable, __file__, "--_memory-child", source, variant, pruning, *_shared_flags(args)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            rows[f"{variant}/{pruning}"] = json.loads(line[-1]) if res.returncode == 0 and line else {
                "error": res.stderr.strip().splitlines()[-1:] or [f"exit {res.returncode}"]}
            print(f"[memory] {source} {variant}/{pruning}: {rows[f'{variant}/{pruning}']}", flush=True)
    return rows


def _shared_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--threads", str(args.threads), "--budget", str(args.budget), "--synthetic-hidden",
             str(args.synthetic_hidden), "--synthetic-layers", str(args.synthetic_layers), "--synthetic-ffn",
             str(args.synthetic_ffn)]
    return flags + (["--checkpoint", args.checkpoint] if args.checkpoint else [])


# ---------------------------------------------------------------------------------------- reporting


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = None
    cap = torch.backends.cpu.get_cpu_capability()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "bitsandbytes": bnb,
        "python": platform.python_version(), "cpu": cpu, "cpu_capability": cap, "threads": args.threads,
        "int8_gemm": "torch._int_mm (AVX-512)" if cap == "AVX512" else "bitsandbytes default backend: fp32 matmul "
                     "of the int8 codes (no AVX-512)",
        "load_average": os.getloadavg()[0],
    }


def markdown(res: dict[str, Any]) -> str:
    env = res["environment"]
    lines = ["# LLM.int8() x token reduction on CPU (issue #7)", "",
             f"torch {env['torch']}, transformers {env['transformers']}, bitsandbytes {env['bitsandbytes']}; "
             f"{env['cpu']} ({env['cpu_capability']}), {env['threads']} thread(s); int8 GEMM: {env['int8_gemm']}. "
             f"Load average at start {env['load_average']:.2f}.", ""]
    if res.get("method_note"):
        lines += [f"Note: {res['method_note']}", ""]
    acc = res.get("accuracy")
    if acc:
        lines += [f"## Accuracy (shapes test, n = {acc['n']}, greedy; {acc['method']} at budget {acc['budget']})", "",
                  "| variant | pruning | accuracy | " + " | ".join(KINDS) + " | s |",
                  "|---|---|---|" + "---|" * len(KINDS) + "---|"]
        for key, r in acc["rows"].items():
            v, p = key.split("/")
            kinds = " | ".join(str(r["per_kind"].get(k, "")) for k in KINDS)
            lines.append(f"| {v} | {p} | {r['accuracy']} | {kinds} | {r['seconds']} |")
        lines += ["", "| pruning | int8 - fp32 (points) | identical predictions |", "|---|---|---|"]
        for p, d in acc["deltas"].items():
            lines.append(f"| {p} | {d['int8_minus_fp32_points']:+.2f} | {100 * d['identical_predictions']:.1f}% |")
        lines += ["", f"Within 1 point: **{acc['within_1_point']}**", ""]
    elif res.get("accuracy_note"):
        lines += ["## Accuracy", "", res["accuracy_note"], ""]
    for lat in res.get("latency", []):
        m = lat["model"]
        lines += [f"## Prefill latency and memory: {lat['source']} (LLM {m['llm_layers']} x {m['llm_hidden']}, "
                  f"FFN {m['llm_ffn']}; {m['prompt_tokens']} prompt tokens, batch 1)", "",
                  "| variant | pruning | prefill ms (median) | IQR ms | vs fp32 same pruning | vs fp32 unpruned "
                  "| model RSS MB | prefill peak growth MB |", "|---|---|---|---|---|---|---|---|"]
        mem = res.get("memory", {}).get(lat["source"], {})
        for key, r in lat["rows"].items():
            v, p = key.split("/")
            mm = mem.get(key, {})
            lines.append(f"| {v} | {p} | {r['prefill_ms']} | {r['iqr_ms']} | {r['vs_fp32_same_pruning']} | "
                         f"{r['vs_fp32_unpruned']} | {mm.get('model_rss_mb', '')} | "
                         f"{mm.get('prefill_peak_growth_mb', '')} |")
        lines += ["", "| variant | model tensor bytes | vs fp32 | int8 linear weights / same in fp16 |",
                  "|---|---|---|---|"]
        fp32 = lat["bytes"]["fp32"]["model_bytes"]
        for v, b in lat["bytes"].items():
            ratio = f"{b['ratio_vs_fp16']:.4f} ({b['int8_layers']} layers)" if "ratio_vs_fp16" in b else ""
            lines.append(f"| {v} | {b['model_bytes']:,} | {b['model_bytes'] / fp32:.3f} | {ratio} |")
        lines.append("")
    if res.get("latency"):
        lines += ["Model RSS: resident set after loading (and converting) minus before, in a fresh process; prefill "
                  "peak growth: peak resident set during one prefill minus the resident set before it. Tensor bytes "
                  "are exact; RSS figures include allocator slack.", ""]
    lines += ["## Checks", ""] + [f"- {k}: **{v}**" for k, v in res["checks"].items()] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/bench_int8", help="writes OUT.json and OUT.md")
    p.add_argument("--checkpoint", default=None, help="LLaVA fixture folder (default: the bundled one)")
    p.add_argument("--n", type=int, default=1000, help="shapes test examples for accuracy")
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--method", default=None, help="pruning method (default pdrop, fastv if pdrop is missing)")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--synthetic-hidden", type=int, default=1024)
    p.add_argument("--synthetic-layers", type=int, default=8)
    p.add_argument("--synthetic-ffn", type=int, default=2816)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--_memory-child", nargs=3, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    method = args.method or ("pdrop" if "pdrop" in tokenprune.methods() else "fastv")
    if args._memory_child:
        print(json.dumps(memory_child(*args._memory_child, args)))
        return {}
    tokenprune.quant.require_bitsandbytes(cpu=True)
    res: dict[str, Any] = {"environment": environment(args), "method": method, "budget": args.budget, "checks": {}}
    if method != "pdrop":
        res["method_note"] = f"measured with {method}: PyramidDrop (pdrop) was not requested or not registered"
    has_fixture = fixture_available(args.checkpoint)
    if args.skip_accuracy:
        res["accuracy_note"] = "skipped (--skip-accuracy)"
    elif not has_fixture:
        res["accuracy_note"] = ("skipped: the trained LLaVA fixture is not there yet (bundled checkpoint missing); "
                                "re-run when it exists, or pass --checkpoint")
    else:
        res["accuracy"] = accuracy_section(args, method)
        res["checks"]["accuracy int8 within 1 point of fp32 (unpruned and pruned)"] = res["accuracy"]["within_1_point"]
    if not args.skip_latency:
        sources = (["fixture"] if has_fixture else []) + ["synthetic"]
        res["latency"] = []
        res["memory"] = {}
        for source in sources:
            print(f"[latency] {source} ...", flush=True)
            res["latency"].append(latency_section(source, args, method))
            if not args.skip_memory:
                res["memory"][source] = memory_section(source, args, method)
        ratios = [lat["bytes"]["int8"]["ratio_vs_fp16"] for lat in res["latency"]]
        res["checks"]["int8 linear weight bytes <= 0.55 x fp16 (all models)"] = all(r <= 0.55 for r in ratios)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
