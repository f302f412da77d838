"""Prompt format and scoring for the shapes benchmark."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_NUM = re.compile(r"-?\d+(?:\.\d+)?")


# each fixture kind's text for one image in its prompt (the processor expands it into the visual tokens)
IMAGE_TEXT = {"llava": "<image>", "llava_next": "<image>",
               "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>"}


def prompt(question: str, kind: str = "llava") -> str:
    """The fixtures' single-turn prompt ``USER: <image>\\n{question} ASSISTANT:`` (the tokenizer adds ``<s>``);
    for ``kind="qwen2_5_vl"`` the image is ``<|vision_start|><|image_pad|><|vision_end|>``, as in Qwen's chat
    template, without the chat roles.

    The processors expand the single ``<image>`` / ``<|image_pad|>`` into the right number of placeholders.
    Raises ``ValueError`` for a kind without a prompt.
    """
    if kind not in IMAGE_TEXT:
        raise ValueError(f"kind must be one of {sorted(IMAGE_TEXT)}, got {kind!r}")
    return f"USER: {IMAGE_TEXT[kind]}\n{question} ASSISTANT:"


def parse_box(text: str) -> list[float] | None:
    """Parse ``[x1, y1, x2, y2]`` from model text; None unless it is 4 numbers in [0, 1] with x1<x2, y1<y2."""
    start = text.find("[")
    end = text.find("]", start + 1)
    if start < 0 or end < 0:
        return None
    nums = _NUM.findall(text[start + 1:end])
    if len(nums) != 4:
        return None
    box = [float(v) for v in nums]
    if not all(0.0 <= v <= 1.0 for v in box) or box[0] >= box[2] or box[1] >= box[3]:
        return None
    return box


def iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def normalize_answer(text: str) -> str:
    """Lower-case, strip ``</s>``, surrounding spaces and trailing punctuation."""
    text = text.replace("</s>", " ").strip().lower()
    return text.rstrip(" .?!").strip()


def score(kind: str, prediction: str, example: Mapping[str, Any]) -> float:
    """1.0 if ``prediction`` answers ``example`` correctly, else 0.0.

    ``box``: IoU >= 0.5 between the parsed ``[x1, y1, x2, y2]`` and ``example["box"]`` (RefCOCO Acc@0.5);
    other kinds: exact match of the normalised answer.
    """
    if kind == "box":
        box = parse_box(prediction)
        return float(box is not None and iou(box, list(example["box"])) >= 0.5)
    from .generator import KINDS

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return float(normalize_answer(prediction) == normalize_answer(str(example["answer"])))
