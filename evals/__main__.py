"""``python -m evals ...`` (and ``accelerate launch -m evals ...``)."""

import sys

from .cli import main

sys.exit(main())
