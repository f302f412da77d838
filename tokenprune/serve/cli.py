"""``tokenprune serve`` / ``python -m tokenprune.serve``: command-line options and start-up."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from .protocol import Limits, Reduction

DESCRIPTION = "OpenAI-compatible chat-completions server for a VLM with visual-token reduction."


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the serve options to ``parser`` (a ``tokenprune serve`` subparser or a standalone one)."""
    d = Limits()
    parser.add_argument("--model", default="llava",
                        help="bundled model name (llava, llava_next, qwen2_5_vl) or a model folder")
    parser.add_argument("--served-model-name", default=None, help="model id clients send (default: from --model)")
    parser.add_argument("--method", default="none", help="default reduction method ('none': unpruned)")
    parser.add_argument("--budget", type=float, default=None, help="default budget in (0, 1]")
    parser.add_argument("--int8", action="store_true", help="LLM.int8() linears (needs tokenprune-vlm[int8])")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=16, help="most requests per batched generate")
    parser.add_argument("--batch-window-ms", type=float, default=10.0, help="wait for more requests to batch")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429s")
    parser.add_argument("--max-images", type=int, default=d.max_images, help="images per request")
    parser.add_argument("--max-pixels", type=int, default=d.max_pixels, help="pixels per image (w*h)")
    parser.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes)
    parser.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024, help="largest request body (413 above)")
    parser.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request body may take (408 after)")
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens, help="largest max_tokens accepted")
    parser.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    parser.add_argument(
        "--allow-remote-images", action="store_true", help="also fetch http(s) image URLs (off: data URLs only)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--log-level", default="warning")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser of ``python -m tokenprune.serve``."""
    return add_arguments(argparse.ArgumentParser(prog="tokenprune serve", description=DESCRIPTION))


def build_app(args: argparse.Namespace):
    """Load the model and return the FastAPI application for parsed ``args``."""
    import torch

    from .. import quantize_int8
    from .app import create_app
    from .model import BUNDLED, ModelRunner, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_model(args.model)
    if args.int8:
        quantize_int8(model)
    name = args.served_model_name or (args.model if args.model in BUNDLED else Path(args.model).name)
    method = None if args.method.lower() in ("none", "off", "unpruned") else args.method
    limits = Limits(
        max_pixels=args.max_pixels,
        max_images=args.max_images,
        max_image_bytes=args.max_image_bytes,
        max_tokens=args.max_tokens,
        default_max_tokens=args.default_max_tokens,
        allow_remote_images=args.allow_remote_images,
    )
    runner = ModelRunner(model, processor, Reduction(method, args.budget), limits, name)
    return create_app(
        runner,
        max_batch=args.max_batch,
        window=args.batch_window_ms / 1000.0,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        body_timeout=args.body_timeout,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted (the handler of the ``serve`` subcommand)."""
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("tokenprune serve needs FastAPI and uvicorn: pip install 'tokenprune-vlm[serve]'") from None
    logging.basicConfig(level=args.log_level.upper())
    try:
        app = build_app(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:  # bad --model/--method/--budget: say so, no traceback
        raise SystemExit(f"tokenprune serve: {exc}") from None
    print(f"tokenprune serve: {app.state.runner.name} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tokenprune.serve``."""
    return run(build_parser().parse_args(argv))
