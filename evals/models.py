"""Loading the model under test (a local checkpoint or a bundled fixture) and prompting it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
           "llava_onevision": "LlavaOnevisionForConditionalGeneration",
           "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
           "qwen3_vl": "Qwen3VLForConditionalGeneration"}


def resolve_dtype(name: str | None) -> torch.dtype | None:
    """``torch.dtype`` for ``"float32"``/``"float16"``/``"bfloat16"`` (or None for the checkpoint's own)."""
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)} or 'auto', got {name!r}")
    return DTYPES[name]


def check_model(spec: str) -> str:
    """Validate ``--model`` without loading anything: the fixture kind of ``bundled:KIND`` (a bundled
    vision-language fixture; the ViT fixture is an image classifier, nothing to prompt) or the ``model_type`` of a
    checkpoint folder of a supported family (``CLASSES``). Typed errors naming ``--model`` and what is allowed."""
    from tokenprune.demo.scoring import IMAGE_TEXT

    if spec.startswith("bundled:"):
        kind = spec.split(":", 1)[1]
        if kind not in IMAGE_TEXT:
            raise ValueError(f"--model: {spec!r} is not a bundled vision-language fixture; allowed: "
                             f"{', '.join('bundled:' + k for k in IMAGE_TEXT)} or a checkpoint folder")
        return kind
    cfg_file = Path(spec) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"--model: {spec} is neither bundled:KIND (llava, llava_next, qwen2_5_vl) nor a "
                                f"checkpoint folder with config.json (nothing is downloaded)")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type not in CLASSES:
        raise ValueError(f"--model: model_type {model_type!r} is not supported; supported: {sorted(CLASSES)}")
    return model_type


def load_model(spec: str, device: str = "cpu", dtype: str | None = None, attn_implementation: str | None = "sdpa",
               int8: bool = False) -> tuple[Any, Any]:
    """``(model, processor)`` for ``spec``: ``bundled:llava`` / ``bundled:llava_next`` / ``bundled:qwen2_5_vl`` (the
    package's fixtures) or a local checkpoint folder of a supported family (``CLASSES``: LLaVA, LLaVA-NeXT,
    LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL). Offline only (``local_files_only``)."""
    import transformers

    kind = check_model(spec)
    if spec.startswith("bundled:"):
        from tokenprune.demo import load

        model, processor = load(kind)
    else:
        path = Path(spec)
        cls = getattr(transformers, CLASSES[kind])
        kwargs: dict[str, Any] = {"local_files_only": True}
        if resolve_dtype(dtype) is not None:
            kwargs["dtype"] = resolve_dtype(dtype)
        model = cls.from_pretrained(path, **kwargs)
        processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    if resolve_dtype(dtype) is not None:
        model = model.to(resolve_dtype(dtype))
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    model = model.to(device).eval()
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"
    if int8:
        import tokenprune

        tokenprune.quantize_int8(model)
    return model, processor


def build_prompt(processor: Any, text: str, style: str = "auto") -> str:
    """The prompt for one image + ``text``: the processor's chat template when it has one
    (``style="auto"``/``"chat"``); a bundled fixture's kind (``"llava_next"``, ``"qwen2_5_vl"``): that fixture's
    single-turn prompt (``tokenprune.demo.prompt``); else LLaVA-1.5's ``USER: <image>\\n{text} ASSISTANT:``."""
    template = getattr(processor, "chat_template", None)
    if style == "chat" or (style == "auto" and template):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(msgs, add_generation_prompt=True)
    from tokenprune.demo.scoring import IMAGE_TEXT, prompt

    return prompt(text, style if style in IMAGE_TEXT else "llava")


def model_inputs(processor: Any, docs: list[dict[str, Any]], device: str, dtype: torch.dtype | None,
                 style: str = "auto") -> dict[str, torch.Tensor]:
    """Processor output for a batch of docs (left-padded), moved to ``device``; floats cast to ``dtype``."""
    texts = [build_prompt(processor, d["text"], style) for d in docs]
    inputs = processor(images=[d["image"] for d in docs], text=texts, return_tensors="pt", padding=True)
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point() and dtype is not None:
                v = v.to(dtype)
        out[k] = v
    return out


def decode_new(processor: Any, sequences: torch.Tensor, prompt_len: int) -> list[str]:
    """Decoded generated continuations (special tokens dropped, stripped)."""
    tok = getattr(processor, "tokenizer", processor)
    return [t.strip() for t in tok.batch_decode(sequences[:, prompt_len:], skip_special_tokens=True)]
