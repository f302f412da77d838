"""The ``tokenprune`` command: ``tokenprune demo`` (more subcommands, e.g. ``serve``, plug in here)."""

from __future__ import annotations

import argparse
import sys

from .evals.demo import add_arguments
from .serve import cli as serve_cli


def _demo(args: argparse.Namespace) -> int:
    from .evals.demo import run

    run(args)
    return 0


def parser() -> argparse.ArgumentParser:
    """The top-level parser; each subcommand sets ``func``."""
    p = argparse.ArgumentParser(prog="tokenprune", description="Visual-token pruning for Hugging Face VLMs.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="bundled LLaVA fixture: unpruned vs methods at budget 0.2 (no download)")
    add_arguments(demo)
    demo.set_defaults(func=_demo)
    serve = sub.add_parser("serve", help=serve_cli.DESCRIPTION, description=serve_cli.DESCRIPTION)
    serve_cli.add_arguments(serve).set_defaults(func=serve_cli.run)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tokenprune`` console script."""
    p = parser()
    args = p.parse_args(argv)
    if getattr(args, "func", None) is None:
        p.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
