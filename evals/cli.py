"""``tokenprune-eval`` / ``python -m evals`` / ``accelerate launch -m evals``: the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .tasks import TASKS


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _data(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"--data expects TASK=PATH, got {item!r}")
        task, path = item.split("=", 1)
        out[task] = path
    return out


def parser() -> argparse.ArgumentParser:
    """The ``tokenprune-eval`` argument parser."""
    p = argparse.ArgumentParser(
        prog="tokenprune-eval",
        description="Accuracy, FLOPs and latency of visual-token pruning methods against the unpruned model.",
    )
    p.add_argument("--model", required=True, help="checkpoint folder (LLaVA, LLaVA-NeXT, LLaVA-OneVision, "
                   "Qwen2-VL, Qwen2.5-VL, Qwen3-VL), or bundled:llava / bundled:llava_next")
    p.add_argument("--task", "--tasks", dest="tasks", type=_names, default=["shapes"],
                   help=f"comma-separated tasks: {', '.join(TASKS)} (default shapes)")
    p.add_argument("--methods", type=_names, default=["none", "random", "fastv"],
                   help="comma-separated methods; 'none' is the unpruned baseline (always run); methods not "
                        "registered in this tokenprune are skipped with a warning")
    p.add_argument("--budgets", type=_floats, default=[0.2], help="comma-separated budgets in (0, 1]")
    p.add_argument("--out", type=Path, default=Path("results"), help="output folder (resumable)")
    p.add_argument("--limit", type=int, default=None, help="docs per task (shapes default 500)")
    p.add_argument("--batch-size", type=int, default=1, help="generation batch (1 = the papers' setting)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the checkpoint's)")
    p.add_argument("--attn-implementation", default="sdpa", help="sdpa or eager")
    p.add_argument("--int8", action="store_true", help="LLM.int8() language model (bitsandbytes)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (16 for short VQA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                   help="local files of a benchmark (default $TOKENPRUNE_DATA/TASK or ./data/TASK)")
    p.add_argument("--latency-samples", type=int, default=8, help="docs timed per cell (0: no latency)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--overlays", type=int, default=4, help="example images with kept-token overlays")
    p.add_argument("--prompt-style", choices=["auto", "llava", "chat"], default="auto",
                   help="auto: the processor's chat template if it has one, else LLaVA-1.5's")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per process (default 1: the fixtures' ops are tiny and extra threads "
                        "mostly add synchronisation; 2 threads ran >6x slower on a busy 2-core machine); "
                        "0: torch's default")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tokenprune-eval``."""
    from .models import check_model

    p = parser()
    args = p.parse_args(argv)
    try:
        check_model(args.model)
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))  # usage and the message, exit status 2: nothing loaded or written
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from .harness import EvalConfig, run

    methods = args.methods if "none" in args.methods else ["none", *args.methods]
    cfg = EvalConfig(
        model=args.model, tasks=args.tasks, methods=methods, budgets=args.budgets, out=args.out, limit=args.limit,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        attn_implementation=args.attn_implementation, int8=args.int8, max_new_tokens=args.max_new_tokens,
        seed=args.seed, data=_data(args.data), latency_samples=args.latency_samples, warmup=args.warmup,
        repeats=args.repeats, overlays=args.overlays, prompt_style=args.prompt_style,
        progress=not args.no_progress,
    )
    results = run(cfg)
    if results is not None:
        print((Path(args.out) / "results.md").read_text())
        print("wrote:", *results["files"], sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
