"""Serving benchmark (issue #9): ``tokenprune serve`` under 1, 4 and 16 concurrent OpenAI clients,
unpruned vs ``--method`` at ``--budget`` (PyramidDrop at 0.2 by default), and the same with int8
linears when ``tokenprune.quantize_int8`` works here. Writes ``OUT.json`` and ``OUT.md``.

One run measures everything side by side: one server process per weight variant (fp32, int8), and
for each concurrency level the reductions take turns on the same server (per-request override in
``extra_body={"tokenprune": ...}``), after a warm-up. Every request streams (client-side time to
first token and end-to-end latency), asks for ``max_tokens`` with ``ignore_eos`` so all variants
generate the same number of tokens, and cycles through images of several sizes. Reported per cell:
requests/s, generated tokens/s, p50/p95 latency, p50 time to first token, mean kept visual tokens,
realised budget, and errors (must be 0).

Models: ``--model`` (bundled name or folder; default the bundled ``llava`` fixture when installed),
or ``--synthetic`` (default when no fixture): a random-weight LLaVA with a 224 px / patch-16 CLIP
tower (196 visual tokens) and a ``--synthetic-hidden`` wide 8-layer Llama, saved to a temporary
folder, where visual tokens dominate the prompt as in real LLaVA.

``python evals/bench_serve.py --out results/bench_serve``   (needs ``tokenprune-vlm[serve]`` and openai)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tokenprune  # noqa: E402
from tokenprune.demo import checkpoint_path  # noqa: E402

SIZES = [(32, 32), (96, 128), (224, 224), (336, 448), (480, 640)]
QUESTION = "What color is the triangle?"


# ------------------------------------------------------------------------------------------ models


def synthetic_model(folder: Path, hidden: int, seed: int = 0) -> str:
    """A random-weight LLaVA-1.5 (CLIP 224/16 -> 196 visual tokens, 8-layer Llama) saved to ``folder``."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny  # the test suite's BPE tokenizer with an <image> token

    torch.manual_seed(seed)
    tok = tiny.tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, patch_size=16, projection_dim=128,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(2.75 * hidden), num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        tokenizer=tok,
        patch_size=16,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return str(folder)


def int8_works() -> tuple[bool, str]:
    """Whether ``quantize_int8`` converts and runs a tiny linear here (bitsandbytes CPU kernels)."""
    try:
        import torch

        from tokenprune.quant import require_bitsandbytes

        bnb = require_bitsandbytes(cpu=True)
        layer = bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False)
        layer.load_state_dict(torch.nn.Linear(16, 16).state_dict())
        layer(torch.randn(2, 16))
        return True, f"bitsandbytes {bnb.__version__}"
    except Exception as exc:  # any failure means: skip the int8 rows, say why
        return False, f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m tokenprune.serve`` in a subprocess on a free loopback port."""

    def __init__(self, model: str, int8: bool, args: argparse.Namespace, log_dir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.name = "bench"
        cmd = [
            sys.executable, "-m", "tokenprune.serve", "--model", model, "--served-model-name", self.name,
            "--method", "none", "--port", str(self.port), "--threads", str(args.threads),
            "--max-batch", str(args.max_batch), "--batch-window-ms", str(args.window_ms),
            "--max-tokens", str(max(args.max_tokens, 16)),
        ] + (["--int8"] if int8 else [])  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.log = log_dir / f"server_{'int8' if int8 else 'fp32'}.log"
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 300
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.25)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                return json.loads(r.read()).get("status") == "ok"
        except OSError:
            return False

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            lines = r.read().decode().splitlines()
        return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in lines if ln and not ln.startswith("#"))}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._out.close()


# ------------------------------------------------------------------------------------------ load


def data_urls(seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for h, w in SIZES:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))] if s else float("nan")


async def run_cell(server: Server, reduction: dict, concurrency: int, n: int, urls: list[str], max_tokens: int):
    """``n`` streamed requests from ``concurrency`` clients; per-request latency, TTFT and usage."""
    import openai

    client = openai.AsyncOpenAI(api_key="unused", base_url=server.base + "/v1", max_retries=0, timeout=600)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    rows: list[dict[str, Any]] = []
    errors: list[str] = []

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            messages = [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
                        {"type": "text", "text": QUESTION},
                    ],
                }
            ]
            t0 = time.perf_counter()
            ttft = None
            usage = None
            try:
                stream = await client.chat.completions.create(
                    model=server.name, messages=messages, max_tokens=max_tokens, stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"tokenprune": reduction, "ignore_eos": True},
                )  # fmt: skip
                async for chunk in stream:
                    if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                        ttft = time.perf_counter() - t0
                    if chunk.usage is not None:
                        usage = chunk.usage
                lat = time.perf_counter() - t0
                ext = usage.model_extra["tokenprune"]
                rows.append(
                    {
                        "latency": lat,
                        "ttft": ttft if ttft is not None else lat,
                        "completion_tokens": usage.completion_tokens,
                        "kept": ext["kept_visual_tokens"],
                        "visual": ext["visual_tokens"],
                        "realized_budget": ext["realized_budget"],
                    }
                )
            except Exception as exc:  # counted and reported
                errors.append(f"{type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    lat = [r["latency"] for r in rows]
    return {
        "concurrency": concurrency,
        "requests": n,
        "ok": len(rows),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": wall,
        "requests_per_s": len(rows) / wall,
        "tokens_per_s": sum(r["completion_tokens"] for r in rows) / wall,
        "p50_latency_s": pct(lat, 50),
        "p95_latency_s": pct(lat, 95),
        "p50_ttft_s": pct([r["ttft"] for r in rows], 50),
        "p95_ttft_s": pct([r["ttft"] for r in rows], 95),
        "mean_visual_tokens": statistics.fmean(r["visual"] for r in rows) if rows else 0,
        "mean_kept_visual_tokens": statistics.fmean(r["kept"] for r in rows) if rows else 0,
        "mean_realized_budget": statistics.fmean(r["realized_budget"] for r in rows) if rows else 0,
    }


def bench_server(server: Server, variants: list[tuple[str, dict]], args: argparse.Namespace) -> list[dict]:
    """All concurrency levels x ``variants`` on one server, variants taking turns at each level."""
    urls = data_urls()
    for _, red in variants:  # warm-up: first-call costs, every batch size path
        asyncio.run(run_cell(server, red, 4, 8, urls, args.max_tokens))
    results = []
    before = server.metrics()
    for c in args.concurrency:
        for name, red in variants:
            cell = asyncio.run(run_cell(server, red, c, max(args.requests, c), urls, args.max_tokens))
            cell["variant"] = name
            results.append(cell)
            print(
                f"  {name:>16} c={c:<3} {cell['requests_per_s']:7.2f} req/s  p50 {cell['p50_latency_s']:.3f} s  "
                f"p95 {cell['p95_latency_s']:.3f} s  ttft {cell['p50_ttft_s']:.3f} s  errors {cell['errors']}",
                flush=True,
            )
    after = server.metrics()
    for cell in results:
        cell["server_errors_during_run"] = after.get('tokenprune_requests_total{status="error"}', 0) - before.get(
            'tokenprune_requests_total{status="error"}', 0
        )
    assert server.healthy(), "server stopped answering"
    return results


# ------------------------------------------------------------------------------------------ report


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# tokenprune serve: throughput and latency",
        "",
        f"Model: {report['model']} ({report['visual_tokens']} visual tokens per image); {report['requests']} streamed "
        f"requests per cell (at least the concurrency), max_tokens={report['max_tokens']} with ignore_eos, images "
        f"{', '.join(f'{h}x{w}' for h, w in SIZES)} in turn; server: --max-batch {report['max_batch']}, "
        f"--batch-window-ms {report['window_ms']}, --threads {report['threads']}. "
        f"{env['cpu_count']} CPUs ({env['platform']}), torch {env['torch']}. int8: {report['int8']}.",
        "",
        "| variant | clients | req/s | tokens/s | p50 latency (s) | p95 latency (s) | p50 TTFT (s) | kept visual "
        "tokens | realised budget | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['variant']} | {r['concurrency']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['p50_latency_s']:.3f} | {r['p95_latency_s']:.3f} | {r['p50_ttft_s']:.3f} | "
            f"{r['mean_kept_visual_tokens']:.1f} / {r['mean_visual_tokens']:.0f} | {r['mean_realized_budget']:.3f} | "
            f"{r['errors']} |"
        )
    base = {r["concurrency"]: r for r in report["results"] if r["variant"] == "unpruned"}
    lines += ["", "Throughput relative to unpruned fp32 at the same concurrency:", ""]
    for r in report["results"]:
        b = base.get(r["concurrency"])
        if b and r["variant"] != "unpruned":
            lines.append(
                f"- {r['variant']}, {r['concurrency']} clients: {r['requests_per_s'] / b['requests_per_s']:.2f}x "
                f"req/s, p50 latency {r['p50_latency_s'] / b['p50_latency_s']:.2f}x"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/bench_serve", help="writes OUT.json and OUT.md")
    p.add_argument("--model", default=None, help="bundled name or model folder (default: bundled llava if installed)")
    p.add_argument("--synthetic", action="store_true", help="random-weight LLaVA with 196 visual tokens")
    p.add_argument("--synthetic-hidden", type=int, default=256)
    p.add_argument("--method", default="pdrop")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per cell (at least the concurrency)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--window-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--int8", choices=["auto", "on", "off"], default="auto")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    if args.model is None and not args.synthetic and (checkpoint_path("llava") / "config.json").is_file():
        args.model = "llava"
    if args.model is None:
        args.model = synthetic_model(tmp / "synthetic_llava", args.synthetic_hidden)
        label = f"synthetic random-weight LLaVA (CLIP 224/16, Llama 8x{args.synthetic_hidden})"
    else:
        label = args.model
    ok8, why8 = int8_works() if args.int8 != "off" else (False, "off (--int8 off)")
    if args.int8 == "on" and not ok8:
        raise SystemExit(f"--int8 on, but int8 does not work here: {why8}")
    reduction = {"method": args.method, "budget": args.budget}
    pruned = f"{args.method}@{args.budget:g}"
    weights = [("fp32", False)] + ([("int8", True)] if ok8 else [])
    results: list[dict] = []
    for wname, int8 in weights:
        print(f"server {wname}: {label}", flush=True)
        server = Server(args.model, int8, args, tmp)
        try:
            prefix = "" if wname == "fp32" else "int8 "
            variants = [(f"{prefix}unpruned", {"method": "none"}), (f"{prefix}{pruned}", reduction)]
            results += bench_server(server, variants, args)
        finally:
            server.stop()
    visual = results[0]["mean_visual_tokens"] if results else 0
    report = {
        "model": label,
        "visual_tokens": visual,
        "method": args.method,
        "budget": args.budget,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch,
        "window_ms": args.window_ms,
        "threads": args.threads,
        "int8": why8 if ok8 else f"skipped ({why8})",
        "environment": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "tokenprune": tokenprune.__version__,
            "python": sys.version.split()[0],
        },
        "results": sorted(results, key=lambda r: (r["concurrency"], r["variant"] not in ("unpruned",))),
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    total_errors = sum(r["errors"] for r in results)
    if total_errors:
        raise SystemExit(f"{total_errors} requests failed")
    return report


if __name__ == "__main__":
    main()
