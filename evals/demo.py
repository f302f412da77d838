"""``tokenprune demo``: a bundled fixture (LLaVA-1.5 by default; ``--model bundled:llava_next`` or
``bundled:qwen2_5_vl``), unpruned and a few methods at budget 0.2 on a few hundred shapes test questions; prints the
table and the files it wrote (results, plots, overlays; under ``results/demo`` by default). No download."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

DEMO_METHODS = ("random", "uniform", "fastv", "pdrop", "feather")
# On M-RoPE the kept tokens keep their 3-D positions: PyramidDrop and FEATHER (which renumber) are refused there.
DEMO_METHODS_MROPE = ("random", "uniform", "fastv", "divprune", "dart")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    p.add_argument("--out", type=Path, default=Path("results/demo"), help="output folder (default results/demo)")
    p.add_argument("--model", default="bundled:llava",
                   help="bundled:llava (default), bundled:llava_next, bundled:qwen2_5_vl or a model folder")
    p.add_argument("--n", type=int, default=300, help="shapes test questions (default 300)")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--methods", default=None,
                   help=f"comma-separated; default: the registered ones of {', '.join(DEMO_METHODS)} "
                        f"(Qwen: {', '.join(DEMO_METHODS_MROPE)})")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--latency-samples", type=int, default=8)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the fixture's ops are tiny, so more threads mostly add "
                        "synchronisation; on a busy 2-core machine 2 threads ran >6x slower)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo and print the table; returns results.json's object."""
    import torch

    import tokenprune

    from .harness import EvalConfig
    from .harness import run as run_eval
    from .models import check_model
    from .results import NOISY_SPREAD

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        kind = check_model(args.model)  # a bundled fixture's kind or a folder's model_type
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"tokenprune demo: {exc}") from None
    if args.model.startswith("bundled:"):
        from tokenprune.demo import checkpoint_path

        if not (checkpoint_path(kind) / "config.json").is_file():
            raise SystemExit(
                f"tokenprune demo: the bundled {kind} fixture is not installed at {checkpoint_path(kind)}; "
                f"reinstall tokenprune-vlm, or pass --model PATH to a checkpoint folder."
            )
    registered = tokenprune.methods()
    default = DEMO_METHODS_MROPE if kind.startswith("qwen") else DEMO_METHODS  # Qwen families: M-RoPE
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else [
        m for m in default if m in registered]
    t0 = time.perf_counter()
    cfg = EvalConfig(model=args.model, tasks=["shapes"], methods=["none", *methods], budgets=[args.budget],
                     out=args.out, limit=args.n, batch_size=args.batch_size, latency_samples=args.latency_samples,
                     repeats=3, warmup=1, overlays=4, progress=not args.no_progress)
    results = run_eval(cfg)
    print(_table(results))
    print(LEGEND.format(n=args.latency_samples, threads=torch.get_num_threads(), noisy=NOISY_SPREAD))
    print("wrote:", *results["files"], sep="\n  ")
    print(f"demo took {time.perf_counter() - t0:.0f} s")
    return results


LEGEND = """
accuracy in % per question type ("all": their mean over the questions); none: the unpruned model.
FLOPs %: prefill compute (vision tower + projector + LLM prefill + LM head, analytic) in % of the unpruned model's.
speed-up: measured prefill time of the unpruned model over this one (per question the median of 3 repeats, then
the median over {n} questions; batch 1, {threads} thread(s)); *: noisy, the repeats of this or the unpruned cell
spread by more than {noisy:.0%} of their median. ideal: the speed-up if time fell with FLOPs (100 / FLOPs %).
"""


def _table(results: dict[str, Any]) -> str:
    """A compact terminal table: accuracy % per question type, FLOPs %, measured and ideal speed-up."""
    from .results import status_text

    cells = [c for c in results["cells"] if c.get("status") == "ok"]
    kinds = sorted({k for c in cells for k in c["metrics"]["by_kind"]})
    head = ["method", "budget", "all", *kinds, "FLOPs %", "speed-up", "ideal"]
    rows = [head]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    times = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    for c in results["cells"]:
        b = "-" if c["budget"] is None else f"{c['budget']:g}"
        if c.get("status") != "ok":
            rows.append([c["method"], b, status_text(c)])
            continue
        rel = c.get("relative") or {}
        by_kind = c["metrics"]["by_kind"]
        rows.append([c["method"], b, pct(c["metrics"]["accuracy"]), *[pct(by_kind.get(k)) for k in kinds],
                     pct(rel.get("flops_ratio")), times(rel.get("speedup_prefill")) + ("*" if rel.get("noisy") else ""),
                     times(rel.get("ideal_speedup"))])
    widths = [max(len(r[i]) for r in rows if len(r) == len(head)) for i in range(len(head))]
    lines = ["  ".join(v.ljust(widths[i]) for i, v in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
