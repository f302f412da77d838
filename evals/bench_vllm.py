"""vLLM serving benchmark (issue #20): a bundled fixture (``--kind``, default LLaVA) served by vLLM's async
engine (the one ``vllm serve`` wraps: engine core in its own process, continuous batching), unpruned vs tokenprune's
plugin per method at ``--budgets``. Per variant and concurrency (1 / 8 / 32 clients, each sending its
next request when the previous one finishes): requests/s, generated tokens/s, p50 time to first token
and p50 latency; each cell serves images no other cell does (vLLM caches encoded images), and the
concurrency-32 cell is the shapes test split (first ``--n`` examples), whose
accuracy is reported too. Greedy, 12 new tokens at most (the fixture's answers). One run, variants
one after another on the same machine; writes ``OUT.json`` and ``OUT.md``.

Runs in the vLLM venv (see README "Serving at scale with vLLM"):
``python evals/bench_vllm.py --out evals/results/bench_vllm``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evals.vllm_agreement import (  # noqa: E402
    KINDS,
    MAX_NEW_TOKENS,
    METHODS,
    engine_args,
    examples_of,
    request,
    versions,
    write,
)
from tokenprune.demo import score  # noqa: E402

CONCURRENCY = (1, 8, 32)


async def _one(engine: Any, req: dict, sp: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    first, out = None, None
    async for out in engine.generate(req, sp, request_id=uuid.uuid4().hex):
        if first is None and out.outputs and out.outputs[0].token_ids:
            first = time.perf_counter() - t0
    end = time.perf_counter() - t0
    return {"ttft": first if first is not None else end, "latency": end, "text": out.outputs[0].text,
            "tokens": len(out.outputs[0].token_ids), "prompt_tokens": len(out.prompt_token_ids)}


async def _cell(engine: Any, reqs: list[dict], concurrency: int, sp: Any) -> dict[str, Any]:
    """``concurrency`` clients working through ``reqs`` (closed loop)."""
    queue = list(enumerate(reqs))
    results: list[dict | None] = [None] * len(reqs)

    async def client() -> None:
        while queue:
            i, ex = queue.pop(0)
            results[i] = await _one(engine, ex, sp)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    done = [r for r in results if r is not None]
    return {
        "concurrency": concurrency,
        "requests": len(done),
        "seconds": round(wall, 3),
        "requests_per_s": round(len(done) / wall, 3),
        "tokens_per_s": round(sum(r["tokens"] for r in done) / wall, 2),
        "ttft_p50_ms": round(1000 * statistics.median(r["ttft"] for r in done), 1),
        "latency_p50_ms": round(1000 * statistics.median(r["latency"] for r in done), 1),
        "prompt_tokens_mean": round(statistics.mean(r["prompt_tokens"] for r in done), 1),
        "_texts": [r["text"] for r in done],
    }


async def _variant(
    method: str | None, budget: float, kind: str, examples: list[dict], sizes: dict[int, int]
) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(**engine_args(method, budget, kind, max_model_len=512, max_num_seqs=32,
                                         enable_prefix_caching=False))
    t0 = time.perf_counter()
    engine = AsyncLLM.from_engine_args(args)
    startup = time.perf_counter() - t0
    sp = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0)
    reqs = [request(e, kind) for e in examples]
    try:
        # every cell (and the warm-up) on its own images, so that none is served from vLLM's caches of an
        # earlier cell's images; the last cell is the first sizes[32] examples (scored)
        starts = dict(zip(CONCURRENCY, [len(reqs) - sizes[1] - sizes[8], len(reqs) - sizes[8], 0]))
        await _cell(engine, reqs[starts[1] - 4 : starts[1]], 4, sp)  # warm-up
        cells = [await _cell(engine, reqs[starts[c] : starts[c] + sizes[c]], c, sp) for c in CONCURRENCY]
    finally:
        engine.shutdown()
        del engine
        gc.collect()
    last = cells[-1]
    acc = [score(ex["kind"], text, ex) for ex, text in zip(examples[: sizes[CONCURRENCY[-1]]], last["_texts"])]
    for c in cells:
        del c["_texts"]
    return {"method": method or "unpruned", "budget": budget if method else 1.0, "startup_s": round(startup, 1),
            "accuracy": round(sum(acc) / len(acc), 4), "accuracy_n": len(acc), "cells": cells}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.1])
    ap.add_argument("--kind", default="llava", choices=KINDS, help="bundled fixture")
    ap.add_argument("--n", type=int, default=100, help="shapes test examples in the concurrency-32 cell (accuracy)")
    ap.add_argument("--out", default=str(ROOT / "evals" / "results" / "bench_vllm"))
    args = ap.parse_args()
    sizes = {1: 8, 8: 32, 32: args.n}
    examples = examples_of(args.kind, args.n + 4 + sizes[1] + sizes[8])  # scored cell, warm-up, cells 1 and 8
    variants = [(None, 1.0)] + [(m, b) for m in args.methods for b in args.budgets]
    t0 = time.time()
    rows = []
    for method, budget in variants:
        rows.append(asyncio.run(_variant(method, budget, args.kind, examples, sizes)))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "model": f"bundled {args.kind} fixture, fp32",
        "engine": "vLLM AsyncLLM (engine core in a separate process), enforce_eager, max_num_seqs 32, "
                  "prefix caching off",
        "requests_per_cell": sizes,
        "max_tokens": MAX_NEW_TOKENS,
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
        "seconds": round(time.time() - t0, 1),
        "command": "python evals/bench_vllm.py " + " ".join(sys.argv[1:]),
    }
    write(Path(args.out), result, markdown(result))


def markdown(result: dict) -> str:
    base = {c["concurrency"]: c for c in result["rows"][0]["cells"]}
    lines = [
        f"# vLLM serving benchmark: tokenprune plugin vs unpruned ({result['model']}, CPU)",
        "",
        f"{result['engine']}; greedy, at most {result['max_tokens']} new tokens; requests per concurrency level "
        f"{result['requests_per_cell']} (the 32-client cell is the shapes test split, scored); "
        f"{result['machine']['cpus']} CPUs; {result['versions']}; `{result['command']}`; {result['seconds']} s.",
        "",
        "| method | budget | prompt tokens | accuracy | clients | req/s | x unpruned | TTFT p50 ms | latency p50 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        for c in r["cells"]:
            ratio = c["requests_per_s"] / base[c["concurrency"]]["requests_per_s"]
            lines.append(
                f"| {r['method']} | {r['budget']} | {c['prompt_tokens_mean']} | {100 * r['accuracy']:.1f} % | "
                f"{c['concurrency']} | {c['requests_per_s']} | {ratio:.2f} | {c['ttft_p50_ms']} | "
                f"{c['latency_p50_ms']} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
