"""Where results live on disk, resuming, and the numbers relative to the unpruned run.

Layout of ``--out``::

    cells/<task>/<method>@<budget>.json   one finished cell (summary, latency, per-doc records)
    cells/<task>/.parts/...               per-process shards while a cell runs
    results.json                          every cell + relative numbers (schema below)
    results.md                            the tables
    plots/<task>_acc_vs_flops.png, plots/<task>_acc_vs_speedup.png
    overlays/<task>_overlays.png          kept tokens per method drawn on example inputs
    inputs/<task>/<i>.png, <i>.txt        those example inputs (image, question)

``results.json`` (``schema: "tokenprune.evals/1"``)::

    {"schema", "created", "run": {model, tasks, methods, budgets, limit, seed, device, dtype,
     attn_implementation, int8, batch_size, max_new_tokens, world_size, versions, flops_convention},
     "skipped_methods": {method: reason},
     "cells": [{"task", "method", "budget", "status": "ok"|"error"|"unreachable", "error",
                "min_budget",                                  # unreachable: the budget must exceed it
                "metrics": {"accuracy", "n", "by_kind", "metric", ["pope"], ["rec"], ...},
                "flops_macs": {"vision", "projector", "llm_prefill", "lm_head", "prefill_total",
                               "decode_per_token", "total"},          # mean per sample, MACs
                "visual_tokens_per_layer", "visual_tokens_layer_mean", "unpruned_visual_tokens",
                "realized_budget", "mean_new_tokens",
                "latency": {"vision_s", "prefill_s", "prefill_s_min", "prefill_spread", "e2e_s",
                            "decode_tokens_per_s", "kv_cache_bytes", "peak_memory_bytes", "samples", "warmup",
                            "repeats", "new_tokens", ...} | null,
                "relative": {"accuracy_pct", "flops_ratio", "llm_flops_ratio", "ideal_speedup",
                             "speedup_prefill", "speedup_prefill_min", "speedup_e2e", "speedup_over_ideal",
                             "noisy"} | null,
                "wall_s"}]}

``flops_ratio`` is prefill_total (vision + projector + LLM prefill + LM head) over the unpruned one;
``llm_flops_ratio`` the papers' LLM-prefill-only ratio; ``ideal_speedup = 1 / flops_ratio``;
``speedup_prefill`` unpruned prefill time over this one (medians; ``speedup_prefill_min`` the same from the
fastest repeats); ``speedup_over_ideal`` their quotient; ``noisy`` when this cell's or the unpruned cell's
prefill repeats spread by more than ``NOISY_SPREAD`` of their median.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SCHEMA = "tokenprune.evals/1"
NOISY_SPREAD = 0.10  # prefill repeats differing by more than this fraction of their median: a noisy cell


def status_text(cell: dict[str, Any]) -> str:
    """What a table shows for a cell without numbers: ``n/a (min budget > X)`` for a budget the method
    cannot reach on the model, else the error."""
    if cell.get("status") == "unreachable":
        return f"n/a (min budget > {cell['min_budget']:.3f})"
    return f"error: {str(cell.get('error'))[:80]}"


def cell_name(method: str, budget: float | None) -> str:
    return f"{method}@{'full' if budget is None else f'{budget:g}'}"


def cell_path(out: Path, task: str, method: str, budget: float | None) -> Path:
    return out / "cells" / task / f"{cell_name(method, budget)}.json"


def load_cell(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """A finished cell with the same fingerprint, or None (missing, unreadable or from other settings)."""
    try:
        cell = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return cell if cell.get("fingerprint") == fingerprint and cell.get("status") == "ok" else None


def write_json(path: Path, obj: Any) -> None:
    """Atomic write (temp file + rename), so an interrupted run never leaves half a cell."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=_default))
    os.replace(tmp, path)


def _default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def relative(cell: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any] | None:
    """Numbers of ``cell`` against the unpruned ``base`` of the same task and run."""
    if base is None or cell.get("status") != "ok" or base.get("status") != "ok":
        return None
    acc, acc0 = cell["metrics"]["accuracy"], base["metrics"]["accuracy"]
    f, f0 = cell["flops_macs"], base["flops_macs"]
    ratio = f["prefill_total"] / f0["prefill_total"] if f0["prefill_total"] else None
    llm_ratio = f["llm_prefill"] / f0["llm_prefill"] if f0["llm_prefill"] else None
    out: dict[str, Any] = {
        "accuracy_pct": 100.0 * acc / acc0 if acc0 else None,
        "flops_ratio": ratio,
        "llm_flops_ratio": llm_ratio,
        "ideal_speedup": 1.0 / ratio if ratio else None,
        "speedup_prefill": None,
        "speedup_prefill_min": None,
        "speedup_e2e": None,
        "speedup_over_ideal": None,
        "noisy": None,
    }
    lat, lat0 = cell.get("latency"), base.get("latency")
    if lat and lat0 and lat.get("prefill_s") and lat0.get("prefill_s"):
        out["speedup_prefill"] = lat0["prefill_s"] / lat["prefill_s"]
        if lat.get("prefill_s_min") and lat0.get("prefill_s_min"):
            out["speedup_prefill_min"] = lat0["prefill_s_min"] / lat["prefill_s_min"]
        out["noisy"] = max(lat.get("prefill_spread") or 0.0, lat0.get("prefill_spread") or 0.0) > NOISY_SPREAD
        out["speedup_e2e"] = lat0["e2e_s"] / lat["e2e_s"] if lat.get("e2e_s") else None
        if out["ideal_speedup"]:
            out["speedup_over_ideal"] = out["speedup_prefill"] / out["ideal_speedup"]
    return out


def assemble(run: dict[str, Any], cells: list[dict[str, Any]], skipped: dict[str, str]) -> dict[str, Any]:
    """The ``results.json`` object: cells (records dropped) with their relative numbers."""
    import datetime

    bases = {c["task"]: c for c in cells if c["method"] == "none" and c.get("status") == "ok"}
    out_cells = []
    for c in cells:
        c = {k: v for k, v in c.items() if k not in ("records", "fingerprint")}
        c["relative"] = relative(c, bases.get(c["task"]))
        out_cells.append(c)
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run": run,
        "skipped_methods": skipped,
        "cells": out_cells,
    }
