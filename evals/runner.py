"""Running one (method, budget) over a task's docs: greedy generation, scoring, FLOPs per sample,
and what the kept visual tokens were (for overlays)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

import tokenprune
from tokenprune import flops

from .models import decode_new, model_inputs
from .tasks import Task

UNPRUNED = "none"


@dataclass
class RunOptions:
    """Generation and measurement settings shared by every cell of a run."""

    batch_size: int = 1
    max_new_tokens: int | None = None  # None: the task's own
    device: str = "cpu"
    dtype: torch.dtype | None = None
    seed: int = 0
    prompt_style: str = "auto"
    overlays: int = 4  # docs (the first ones) whose kept tokens are recorded for overlays

    def new_tokens(self, task: Task) -> int:
        return self.max_new_tokens or task.max_new_tokens


def method_params(method: str, seed: int) -> dict[str, Any]:
    """Extra parameters passed to ``tokenprune.patch`` (the run's seed for seeded methods)."""
    from tokenprune.methods.base import REGISTRY

    cls = REGISTRY.get(method)
    if cls is not None and "seed" in {f.name for f in dataclasses.fields(cls)}:
        return {"seed": seed}
    return {}


@contextmanager
def patched(model: Any, method: str, budget: float | None, seed: int = 0):
    """``tokenprune.patch`` for ``method`` at ``budget`` (nothing for ``"none"``); yields the handle or None."""
    if method == UNPRUNED:
        yield None
        return
    handle = tokenprune.patch(model, method, budget=budget, **method_params(method, seed))
    try:
        yield handle
    finally:
        handle.remove()


def _layouts(model: Any, n_visual: int, meta: dict[str, Any]) -> Any:
    from tokenprune.adapters import anatomy_of

    an = anatomy_of(model)
    return an.layouts([n_visual], meta)[0] if an.sequence is not None else None


def overlay_record(model: Any, inputs: dict[str, Any], trace: Any, b: int) -> dict[str, Any] | None:
    """Kept original visual-token indices of sample ``b`` after the last stage, with every token's
    normalised centre (y, x), tile id and the patch grid, for drawing overlays."""
    ids = inputs["input_ids"][b]
    n_vis = int((ids == model.config.image_token_id).sum())
    # what the adapters lay an image out from (LLaVA-NeXT: its size; Qwen: its patch grid), one image per sample
    meta = {k: inputs[k][b: b + 1] for k in ("image_sizes", "image_grid_thw") if inputs.get(k) is not None}
    try:
        lay = _layouts(model, n_vis, meta)
    except Exception:  # noqa: BLE001 - overlays are best effort (e.g. multi-image samples)
        return None
    if lay is None:
        return None
    if trace is not None and trace.stages:
        kept = trace.stages[-1].kept[b]
        kept = kept[kept >= 0].tolist()
    else:
        kept = list(range(n_vis))
    return {"kept": kept, "y": lay.y.tolist(), "x": lay.x.tolist(), "tile": lay.tile.tolist(),
            "grid": list(lay.grid), "stages": [s.name for s in trace.stages] if trace is not None else []}


def run_docs(model: Any, processor: Any, task: Task, docs: Iterable[tuple[int, dict[str, Any]]], method: str,
             budget: float | None, opts: RunOptions, progress: Any = None) -> list[dict[str, Any]]:
    """Generate, score and cost every ``(index, doc)``; returns one record per doc (JSON-able)."""
    docs = list(docs)
    records: list[dict[str, Any]] = []
    new_tokens = opts.new_tokens(task)
    tok = getattr(processor, "tokenizer", processor)
    with patched(model, method, budget, opts.seed) as handle:
        for start in range(0, len(docs), opts.batch_size):
            chunk = docs[start: start + opts.batch_size]
            inputs = model_inputs(processor, [d for _, d in chunk], opts.device, opts.dtype, opts.prompt_style)
            with torch.no_grad():
                seq = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            trace = handle.trace if handle is not None else None
            preds = decode_new(processor, seq, inputs["input_ids"].shape[1])
            gen = seq[:, inputs["input_ids"].shape[1]:]
            eos = tok.eos_token_id
            n_gen = [int(((row != tok.pad_token_id) & (row != eos)).sum()) + int((row == eos).any()) for row in gen]
            costs = flops.estimate(model, inputs, trace, new_tokens=new_tokens)
            for b, (idx, doc) in enumerate(chunk):
                rec = task.score(doc, preds[b])
                cost = costs[b]
                rec.update({
                    "index": idx,
                    "id": doc["id"],
                    "prediction": preds[b],
                    "new_tokens": n_gen[b],
                    "flops": {
                        "vision": cost.vision, "projector": cost.projector, "llm_prefill": cost.llm_prefill,
                        "lm_head": cost.lm_head, "prefill_total": cost.prefill_total,
                        "decode_per_token": cost.decode_per_token, "total": cost.total(max(1, n_gen[b])),
                    },
                    "visual_tokens_per_layer": (
                        [float(trace.tokens_entering(j)[b]) for j in range(trace.num_layers)]
                        if trace is not None else None
                    ),
                    "unpruned_visual_tokens": int((inputs["input_ids"][b] == model.config.image_token_id).sum()),
                })
                if idx < opts.overlays:
                    rec["overlay"] = overlay_record(model, inputs, trace, b)
                records.append(rec)
            if progress is not None:
                progress.update(len(chunk))
    return records


def summarize(task: Task, records: list[dict[str, Any]], num_layers: int) -> dict[str, Any]:
    """Cell-level numbers: the task's metrics, mean FLOPs per stage (MACs), token bookkeeping."""
    records = sorted(records, key=lambda r: r["index"])
    n = max(1, len(records))
    keys = records[0]["flops"].keys() if records else []
    mean_flops = {k: sum(r["flops"][k] for r in records) / n for k in keys}
    per_layer = None
    realized = 1.0
    if records and records[0]["visual_tokens_per_layer"] is not None:
        per_layer = [sum(r["visual_tokens_per_layer"][j] for r in records) / n for j in range(num_layers)]
        unpruned = sum(r["unpruned_visual_tokens"] for r in records) / n
        realized = sum(per_layer) / (unpruned * num_layers) if unpruned else 1.0
    return {
        "metrics": task.aggregate(records),
        "flops_macs": mean_flops,
        "visual_tokens_per_layer": per_layer,
        "visual_tokens_layer_mean": sum(per_layer) / len(per_layer) if per_layer else (
            sum(r["unpruned_visual_tokens"] for r in records) / n),
        "unpruned_visual_tokens": sum(r["unpruned_visual_tokens"] for r in records) / n,
        "realized_budget": realized,
        "mean_new_tokens": sum(r["new_tokens"] for r in records) / n,
    }
