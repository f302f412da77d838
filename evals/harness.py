"""The evaluation run: every (task, method, budget) cell, resumable, data-parallel under accelerate."""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import tokenprune
from tokenprune.errors import BudgetError

from . import latency as L
from .dist import Dist
from .models import load_model, resolve_dtype
from .results import assemble, cell_name, cell_path, load_cell, write_json
from .runner import UNPRUNED, RunOptions, run_docs, summarize
from .tasks import get_task

log = logging.getLogger("tokenprune.evals")
FLOPS_CONVENTION = (
    "MACs (FLOPs = 2 x MACs). Decoder layer on n tokens: n*d*(d_q + 2*d_kv) + n*d_q*d + 2*n^2*d_q + 3*n*d*m "
    "(gated MLP; 2ndm otherwise): PyramidDrop's 4nd^2 + 2n^2d + 3ndm with the k/v projections at their GQA size. "
    "Per sample, batch-1 (no padding). Stages: vision (patch embed + all encoder layers, every tile), projector, "
    "llm_prefill (decoder layers), lm_head (last prompt token), decode_per_token (mean over the new tokens)."
)


@dataclass
class EvalConfig:
    """Everything a run needs (the CLI's options)."""

    model: str
    tasks: list[str]
    methods: list[str]
    budgets: list[float]
    out: Path
    limit: int | None = None
    batch_size: int = 1
    device: str = "cpu"
    dtype: str | None = None
    attn_implementation: str | None = "sdpa"
    int8: bool = False
    max_new_tokens: int | None = None
    seed: int = 0
    data: dict[str, str] = field(default_factory=dict)
    latency_samples: int = 8
    warmup: int = 1
    repeats: int = 3
    overlays: int = 4
    prompt_style: str = "auto"
    progress: bool = True
    report: bool = True

    def fingerprint(self, task: str, method: str, budget: float | None) -> dict[str, Any]:
        """What must match for a finished cell to be reused."""
        return {"model": self.model, "task": task, "method": method, "budget": budget, "limit": self.limit,
                "seed": self.seed, "max_new_tokens": self.max_new_tokens, "dtype": self.dtype,
                "attn_implementation": self.attn_implementation, "int8": self.int8, "batch_size": self.batch_size,
                "prompt_style": self.prompt_style, "data": self.data.get(task), "latency_samples": self.latency_samples,
                "tokenprune": tokenprune.__version__}


def available_methods(requested: list[str]) -> tuple[list[str], dict[str, str]]:
    """Requested methods that are registered now (plus ``none``), and the skipped ones with why."""
    known = tokenprune.methods()
    keep, skipped = [], {}
    for m in requested:
        if m == UNPRUNED or m in known:
            keep.append(m)
        else:
            skipped[m] = f"not registered in this tokenprune (available: {sorted(known)})"
    return keep, skipped


def _fixture(cfg: EvalConfig) -> str | None:
    """The bundled fixture under test (``bundled:KIND`` -> ``KIND``), else None."""
    return cfg.model.split(":", 1)[1] if cfg.model.startswith("bundled:") else None


def _style(cfg: EvalConfig) -> str:
    """Bundled fixtures were trained on their own single-turn prompt (``tokenprune.demo.prompt(q, kind)``):
    ``auto`` means that for them."""
    fixture = _fixture(cfg)
    return fixture if cfg.prompt_style == "auto" and fixture else cfg.prompt_style


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False)


def run(cfg: EvalConfig) -> dict[str, Any] | None:
    """Run every cell (skipping finished ones), then write results.json / results.md / plots on the
    main process. Returns the results object there (None on other processes), with ``files``: the paths
    this call wrote (results.json and the reports; not saved in results.json)."""
    dist = Dist(cfg.device)
    out = Path(cfg.out)
    device = dist.device(cfg.device)
    torch.manual_seed(cfg.seed)
    methods, skipped = available_methods(cfg.methods)
    for m, why in skipped.items():
        if dist.is_main:
            log.warning("skipping method %s: %s", m, why)
    model, processor = load_model(cfg.model, device, cfg.dtype, cfg.attn_implementation, cfg.int8)
    dtype = resolve_dtype(cfg.dtype)
    cells: list[dict[str, Any]] = []
    num_layers = model.config.get_text_config().num_hidden_layers
    for task_name in cfg.tasks:
        task = get_task(task_name, fixture=_fixture(cfg))
        docs = task.docs(cfg.limit, cfg.seed, cfg.data.get(task_name))
        opts = RunOptions(batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, device=device, dtype=dtype,
                          seed=cfg.seed, prompt_style=_style(cfg), overlays=cfg.overlays)
        if dist.is_main and cfg.overlays:
            _save_overlay_images(out, task_name, docs[: cfg.overlays])
        plan = [(UNPRUNED, None)] + [(m, b) for m in methods if m != UNPRUNED for b in cfg.budgets]
        for method, budget in plan:
            cells.append(_run_cell(cfg, dist, model, processor, task, docs, opts, method, budget, num_layers, out))
    if not dist.is_main:
        return None
    results = assemble(_run_info(cfg, dist, device), cells, skipped)
    write_json(out / "results.json", results)
    files = [out / "results.json"]
    if cfg.report:
        from .report import write_reports

        files += write_reports(results, out)
    return {**results, "files": files}


def _run_cell(cfg: EvalConfig, dist: Dist, model: Any, processor: Any, task: Any, docs: list[dict[str, Any]],
              opts: RunOptions, method: str, budget: float | None, num_layers: int, out: Path) -> dict[str, Any]:
    path = cell_path(out, task.name, method, budget)
    fp = cfg.fingerprint(task.name, method, budget)
    done = load_cell(path, fp)
    dist.barrier()
    if done is not None:
        if dist.is_main:
            log.info("%s %s: finished earlier, reusing %s", task.name, cell_name(method, budget), path)
        return done
    t0 = time.perf_counter()
    shard = [(i, docs[i]) for i in dist.shard(len(docs))]
    part = path.parent / ".parts" / f"{cell_name(method, budget)}.rank{dist.rank}.json"
    bar = _progress(len(shard), f"{task.name} {cell_name(method, budget)}", cfg.progress and dist.is_main)
    error, minimum = None, None
    try:
        records = run_docs(model, processor, task, shard, method, budget, opts, bar)
    except Exception as e:  # noqa: BLE001 - one failing method must not end the run
        records, error = [], f"{type(e).__name__}: {e}"
        minimum = e.minimum if isinstance(e, BudgetError) else None
        if minimum is None:
            log.warning("%s %s failed: %s", task.name, cell_name(method, budget), error)
        else:  # a budget the method cannot reach on this model: reported as n/a, not as a failure
            log.info("%s %s: n/a, the budget must exceed %.3f on this model", task.name, cell_name(method, budget),
                     minimum)
    finally:
        if bar is not None:
            bar.close()
    write_json(part, {"records": records, "error": error, "min_budget": minimum})
    dist.barrier()
    cell: dict[str, Any] = {"task": task.name, "method": method, "budget": budget, "fingerprint": fp}
    if dist.is_main:
        merged, errors, minima = [], [], []
        for r in range(dist.world):
            p = path.parent / ".parts" / f"{cell_name(method, budget)}.rank{r}.json"
            shard_out = json.loads(p.read_text())
            merged.extend(shard_out["records"])
            if shard_out["error"]:
                errors.append(shard_out["error"])
            if shard_out.get("min_budget") is not None:
                minima.append(shard_out["min_budget"])
            p.unlink()
        if minima:
            cell.update(status="unreachable", error=errors[0], min_budget=max(minima))
        elif errors:
            cell.update(status="error", error=errors[0])
        else:
            merged.sort(key=lambda r: r["index"])
            cell.update(status="ok", error=None, **summarize(task, merged, num_layers))
            cell["latency"] = _latency(cfg, model, processor, task, docs, opts, method, budget)
            cell["records"] = merged
        cell["wall_s"] = time.perf_counter() - t0
        write_json(path, cell)
    dist.barrier()
    return cell


def _latency(cfg: EvalConfig, model: Any, processor: Any, task: Any, docs: list[dict[str, Any]], opts: RunOptions,
             method: str, budget: float | None) -> dict[str, Any] | None:
    if cfg.latency_samples <= 0:
        return None
    from .runner import patched

    with patched(model, method, budget, cfg.seed):
        return L.measure(model, processor, docs[: cfg.latency_samples], opts.new_tokens(task), opts.device,
                         opts.dtype, cfg.warmup, cfg.repeats, opts.prompt_style)


def _save_overlay_images(out: Path, task: str, docs: list[dict[str, Any]]) -> None:
    folder = out / "inputs" / task
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        d["image"].save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(d["text"])


def _run_info(cfg: EvalConfig, dist: Dist, device: str) -> dict[str, Any]:
    import transformers

    info = {k: v for k, v in vars(cfg).items() if k not in ("out", "progress", "report")}
    info.update({
        "out": str(cfg.out), "world_size": dist.world, "device": device,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() and device.startswith("cuda") else None,
        "versions": {"tokenprune": tokenprune.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "flops_convention": FLOPS_CONVENTION,
        "methods_registered": tokenprune.methods(),
    })
    return info


__all__ = ["EvalConfig", "run", "available_methods", "FLOPS_CONVENTION"]
