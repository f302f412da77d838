"""``python -m tokenprune.serve --model llava --method pdrop --budget 0.2``."""

from .cli import main

raise SystemExit(main())
