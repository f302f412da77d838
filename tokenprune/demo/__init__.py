"""Bundled demo: the synthetic *shapes* benchmark and small trained fixture models (no download).

* :func:`shapes` -- deterministic benchmark examples (attribute / counting / existence / localization / box).
* :func:`fixture_shapes` -- the examples a fixture is evaluated on (its image aspect).
* :func:`load` -- ``(model, processor)`` for the bundled ``"llava"``, ``"llava_next"``, ``"qwen2_5_vl"`` or
  ``"vit"`` fixture.
* :func:`prompt` -- the prompt format the fixtures were trained with.
* :func:`score` -- per-example scoring (exact match; box via IoU >= 0.5).
"""

from __future__ import annotations

from .generator import KINDS, shapes
from .loading import CHECKPOINT_DIR, MODEL_KINDS, checkpoint_path, fixture_shapes, load
from .scoring import iou, parse_box, prompt, score

__all__ = [
    "CHECKPOINT_DIR",
    "KINDS",
    "MODEL_KINDS",
    "checkpoint_path",
    "fixture_shapes",
    "iou",
    "load",
    "parse_box",
    "prompt",
    "score",
    "shapes",
]
