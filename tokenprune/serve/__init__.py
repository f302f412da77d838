"""OpenAI-compatible serving of a VLM with visual-token reduction (``pip install 'tokenprune-vlm[serve]'``).

``python -m tokenprune.serve --model llava --method pdrop --budget 0.2`` (or ``tokenprune serve``),
then any OpenAI client against ``http://127.0.0.1:8000/v1``. Modules: :mod:`.protocol` (request
parsing and validation), :mod:`.model` (the model, encoding, batched generation), :mod:`.scheduler`
(dynamic batching), :mod:`.metrics` (Prometheus), :mod:`.app` (routes), :mod:`.cli` (options).
FastAPI/uvicorn are imported only by :mod:`.app` and when serving.
"""

from .cli import add_arguments, build_app, main, run
from .errors import APIError
from .protocol import Limits, Reduction

__all__ = ["APIError", "Limits", "Reduction", "add_arguments", "build_app", "main", "run"]
