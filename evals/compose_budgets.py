"""Realised budgets of composed methods (issue #17): a list of methods shares one budget, each of the
m token methods keeping ``budget ** (1/m)`` of what reaches it.

A randomly initialised LLaVA (the realised budget depends on token counts only, not on weights) with
LLaVA-1.5's 24x24 = 576-token grid (a 192-px, patch-8 CLIP tower, 3 layers, 32 wide) and a 32-layer,
64-wide Llama; a batch of two images. For each composition and budget: the realised budget
(``handle.trace.realized_budget``) and its relative error, or the typed error of a budget the
composition cannot reach. ``python -m evals.compose_budgets --out results/compose_budgets`` writes
``compose_budgets.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import tokenprune
from tokenprune.errors import TokenPruneError

COMPOSITIONS = (("hired", "pdrop"), ("visionzip", "fastv"), ("uniform", "feather"), ("random", "pdrop"),
                ("tome", "pdrop"), ("pdrop", "early_exit"))  # fmt: skip
BUDGETS = (0.1, 0.2, 0.3, 0.5, 0.8)


def model_and_inputs(image: int, patch: int, layers: int) -> tuple[Any, dict]:
    """A random LLaVA with an ``(image / patch)**2``-token grid and ``layers`` decoder layers, and a
    batch of two prompts with one image each (input ids built directly: no tokenizer needed)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image, patch_size=patch, projection_dim=32)  # fmt: skip
    text = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=299,
                                                      vision_feature_layer=-2)).eval()  # fmt: skip
    n = (image // patch) ** 2
    ids = torch.tensor([[1, 5, 6] + [299] * n + [7, 8, 9, 10]] * 2)
    mean, std = np.array([0.48, 0.46, 0.41]), np.array([0.27, 0.26, 0.28])
    rng = np.random.default_rng(0)
    pixels = [(np.asarray(Image.fromarray(rng.integers(0, 255, (image, image, 3), dtype=np.uint8))) / 255 - mean) / std
              for _ in range(2)]  # fmt: skip
    pixel_values = torch.tensor(np.stack(pixels), dtype=torch.float32).permute(0, 3, 1, 2)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel_values}


def measure(image: int = 192, patch: int = 8, layers: int = 32, budgets=BUDGETS, compositions=COMPOSITIONS) -> dict:
    model, inputs = model_and_inputs(image, patch, layers)
    rows = []
    for combo in compositions:
        for budget in budgets:
            row: dict[str, Any] = {"methods": list(combo), "budget": budget}
            try:
                with tokenprune.patch(model, list(combo), budget=budget) as handle, torch.no_grad():
                    model(**inputs)
                realised = handle.trace.realized_budget
                row.update(realised=round(realised, 4), relative_error=round(abs(realised - budget) / budget, 4),
                           kept_per_stage={s.name: s.counts.tolist() for s in handle.trace.stages})  # fmt: skip
            except TokenPruneError as exc:
                row["refused"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
    meta = {"visual_tokens": (image // patch) ** 2, "llm_layers": layers, "batch": 2}
    return {"meta": meta, "rows": rows}


def markdown(result: dict) -> str:
    meta = result["meta"]
    budgets = sorted({r["budget"] for r in result["rows"]})
    out = [f"Realised budgets of compositions: {meta['visual_tokens']} visual tokens, {meta['llm_layers']} LLM "
           f"layers, batch {meta['batch']} (`python -m evals.compose_budgets`).", "",
           "| methods | " + " | ".join(f"b={b:g}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for combo in dict.fromkeys(tuple(r["methods"]) for r in result["rows"]):
        cells = {r["budget"]: (f"{r['realised']:.4f}" if "realised" in r else "refused")
                 for r in result["rows"] if tuple(r["methods"]) == combo}  # fmt: skip
        out.append(f"| {'+'.join(combo)} | " + " | ".join(cells[b] for b in budgets) + " |")
    worst = max((r["relative_error"] for r in result["rows"] if "realised" in r), default=0.0)
    out += ["", f"Worst relative error: {100 * worst:.2f} %."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="evals/results/compose_budgets", help="output path without extension")
    ap.add_argument("--image", type=int, default=192, help="image side in pixels (grid = (image / patch)^2)")
    ap.add_argument("--patch", type=int, default=8, help="patch side in pixels")
    ap.add_argument("--layers", type=int, default=32, help="LLM decoder layers")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(args.image, args.patch, args.layers)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
