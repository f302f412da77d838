"""Load the bundled fixture checkpoints (package data) with ``from_pretrained``; works offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
MODEL_KINDS = ("llava", "llava_next", "qwen2_5_vl", "vit")


def checkpoint_path(kind: str = "llava") -> Path:
    """Folder of the bundled checkpoint for ``kind``."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    return CHECKPOINT_DIR / kind


def fixture_shapes(kind: str, split: str = "test", n: int = 500, seed: int = 0) -> list[dict[str, Any]]:
    """The ``shapes`` examples fixture ``kind`` is evaluated on: square, wide and tall images
    (``aspect="mixed"``) for ``qwen2_5_vl``, which was trained on them; square images otherwise."""
    from .generator import shapes

    checkpoint_path(kind)  # validates kind
    return shapes(split, n, seed=seed, aspect="mixed" if kind == "qwen2_5_vl" else "square")


def load(kind: str = "llava", path: str | Path | None = None) -> tuple[Any, Any]:
    """Return ``(model, processor)`` of the bundled fixture ``kind`` ("llava", "llava_next", "qwen2_5_vl" or "vit").

    The ``qwen2_5_vl`` processor is ``tokenprune.demo.build.ImageOnlyQwen2_5_VLProcessor`` (Qwen2.5-VL's
    processor without its video processor, which needs torchvision); its images use ``shapes(...,
    aspect="mixed")`` and its prompt ``prompt(q, "qwen2_5_vl")``.

    ``path`` optionally points at another checkpoint folder of the same kind (e.g. a training output).
    Models come back in eval mode, fp32, on CPU. Raises ``ValueError`` for an unknown ``kind`` and
    ``FileNotFoundError`` if the checkpoint is missing from the installation.
    """
    path = checkpoint_path(kind) if path is None else Path(path)
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"bundled checkpoint for kind={kind!r} not found at {path}")
    if kind == "llava":
        from transformers import LlavaForConditionalGeneration, LlavaProcessor

        model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True)
        processor = LlavaProcessor.from_pretrained(path, local_files_only=True)
    elif kind == "llava_next":
        from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

        model = LlavaNextForConditionalGeneration.from_pretrained(path, local_files_only=True)
        processor = LlavaNextProcessor.from_pretrained(path, local_files_only=True)
    elif kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration

        from .build import ImageOnlyQwen2_5_VLProcessor

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, local_files_only=True)
        processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(path, local_files_only=True)
    else:
        from transformers import ViTForImageClassification, ViTImageProcessorPil

        model = ViTForImageClassification.from_pretrained(path, local_files_only=True)
        processor = ViTImageProcessorPil.from_pretrained(path, local_files_only=True)
    model.eval()
    return model, processor
