"""Reports from ``results.json``: a markdown table, Pareto plots and kept-token overlays."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .results import NOISY_SPREAD, cell_path, status_text

log = logging.getLogger("tokenprune.evals")


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "–" if v is None else fmt.format(v)


def markdown(results: dict[str, Any]) -> str:
    """One table per task: accuracy (and per kind), relative accuracy, FLOPs, tokens, latency, speed-ups."""
    run = results["run"]
    lines = [
        f"# tokenprune eval: `{run['model']}`",
        "",
        f"device {run['device']} ({run.get('gpu') or 'cpu'}), dtype {run.get('dtype') or 'checkpoint'}, "
        f"attention {run.get('attn_implementation')}, batch {run['batch_size']}, seed {run['seed']}, "
        f"processes {run['world_size']}; greedy decoding.",
        "",
        "FLOPs: " + run["flops_convention"],
        "",
    ]
    if results.get("skipped_methods"):
        lines += [f"Skipped: {', '.join(f'`{m}` ({why})' for m, why in results['skipped_methods'].items())}", ""]
    for task in dict.fromkeys(c["task"] for c in results["cells"]):
        cells = [c for c in results["cells"] if c["task"] == task]
        kinds = sorted({k for c in cells if c.get("status") == "ok" for k in c["metrics"].get("by_kind", {})})
        metric = next((c["metrics"]["metric"] for c in cells if c.get("status") == "ok"), "accuracy")
        lines += [f"## {task}", "", f"accuracy = {metric}; n = "
                  f"{next((c['metrics']['n'] for c in cells if c.get('status') == 'ok'), 0)}", ""]
        head = ["method", "budget", "accuracy", "rel. acc %", *kinds, "vis. tokens/layer", "realized budget",
                "prefill GMACs", "FLOPs ratio", "LLM FLOPs ratio", "prefill ms", "speed-up", "ideal", "speed-up/ideal",
                "e2e ms", "decode tok/s", "KV MiB"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in cells:
            budget = "–" if c["budget"] is None else f"{c['budget']:g}"
            if c.get("status") != "ok":
                lines.append(f"| {c['method']} | {budget} | {status_text(c)} |")
                continue
            m, rel, lat = c["metrics"], c.get("relative") or {}, c.get("latency") or {}
            row = [c["method"], budget, _f(m["accuracy"]), _f(rel.get("accuracy_pct"), "{:.1f}"),
                   *[_f(m["by_kind"].get(k)) for k in kinds],
                   _f(c.get("visual_tokens_layer_mean"), "{:.1f}"), _f(c.get("realized_budget"), "{:.3f}"),
                   _f(c["flops_macs"]["prefill_total"] / 1e9, "{:.4f}"), _f(rel.get("flops_ratio")),
                   _f(rel.get("llm_flops_ratio")), _f(lat.get("prefill_s") and lat["prefill_s"] * 1e3, "{:.2f}"),
                   _f(rel.get("speedup_prefill"), "{:.2f}x") + ("*" if rel.get("noisy") else ""),
                   _f(rel.get("ideal_speedup"), "{:.2f}x"),
                   _f(rel.get("speedup_over_ideal"), "{:.2f}"), _f(lat.get("e2e_s") and lat["e2e_s"] * 1e3, "{:.1f}"),
                   _f(lat.get("decode_tokens_per_s"), "{:.1f}"),
                   _f(lat.get("kv_cache_bytes") and lat["kv_cache_bytes"] / 2**20, "{:.3f}")]
            lines.append("| " + " | ".join(row) + " |")
        if any((c.get("relative") or {}).get("noisy") for c in cells):
            lines += ["", f"\\* noisy timing: the prefill repeats of this or the unpruned cell spread by more than "
                          f"{NOISY_SPREAD:.0%} of their median (`prefill_spread` in results.json); not a speed-up "
                          "to quote."]
        extra = [c for c in cells if c.get("status") == "ok" and ("pope" in c["metrics"] or "rec" in c["metrics"])]
        if extra:
            lines += ["", "| method | budget | POPE acc | P | R | F1 | yes-ratio | REC IoU | Acc@0.5 | Center acc |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for c in extra:
                p, r = c["metrics"].get("pope", {}), c["metrics"].get("rec", {})
                budget = "–" if c["budget"] is None else f"{c['budget']:g}"
                lines.append("| " + " | ".join([c["method"], budget, *[_f(p.get(k)) for k in
                             ("accuracy", "precision", "recall", "f1", "yes_ratio")],
                             *[_f(r.get(k)) for k in ("IoU", "ACC@0.5", "Center_ACC")]]) + " |")
        lines.append("")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(results: dict[str, Any], folder: Path) -> list[Path]:
    """Per task: accuracy vs relative FLOPs (one line per method, Pareto view) and accuracy vs measured
    prefill speed-up (when the run was timed). Needs matplotlib (the ``eval`` extra)."""
    plt = _plt()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for task in dict.fromkeys(c["task"] for c in results["cells"]):
        cells = [c for c in results["cells"] if c["task"] == task and c.get("status") == "ok" and c.get("relative")]
        base = next((c for c in cells if c["method"] == "none"), None)
        for key, xlabel, fname in (("flops_ratio", "prefill FLOPs relative to unpruned", "acc_vs_flops"),
                                   ("speedup_prefill", "measured prefill speed-up (x)", "acc_vs_speedup")):
            if not any(c["relative"].get(key) is not None for c in cells):
                continue
            fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
            for method in dict.fromkeys(c["method"] for c in cells if c["method"] != "none"):
                pts = sorted((c["relative"][key], c["metrics"]["accuracy"]) for c in cells
                             if c["method"] == method and c["relative"].get(key) is not None)
                if pts and base is not None and base["relative"].get(key) is not None:
                    pts.append((base["relative"][key], base["metrics"]["accuracy"]))  # budget 1 = unpruned
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=method)
            if base is not None and base["relative"].get(key) is not None:
                ax.scatter([base["relative"][key]], [base["metrics"]["accuracy"]], marker="*", s=160, c="k",
                           label="unpruned", zorder=5)
            if key == "speedup_prefill":
                ax.axvline(1.0, color="grey", lw=0.6, ls=":")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{task} accuracy")
            ax.set_title(f"{task}: accuracy vs {'FLOPs' if key == 'flops_ratio' else 'speed-up'}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = folder / f"{task}_{fname}.png"
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return written


def overlays(out: Path, results: dict[str, Any], budget: float | None = None) -> list[Path]:
    """Per task: example images (rows) x methods (columns), kept visual tokens bright and dropped ones
    dimmed, drawn from the per-doc ``overlay`` records in the cells. ``budget`` picks the budget shown
    (default: the smallest evaluated)."""
    import numpy as np
    from PIL import Image

    plt = _plt()
    written = []
    for task in dict.fromkeys(c["task"] for c in results["cells"]):
        img_dir = out / "inputs" / task
        if not img_dir.is_dir():
            continue
        budgets = sorted({c["budget"] for c in results["cells"] if c["task"] == task and c["budget"] is not None})
        b = budget if budget is not None else (budgets[0] if budgets else None)
        cols = []
        for c in results["cells"]:
            if c["task"] == task and c.get("status") == "ok" and (c["method"] == "none" or c["budget"] == b):
                full = json.loads(cell_path(out, task, c["method"], c["budget"]).read_text())
                recs = {r["index"]: r.get("overlay") for r in full.get("records", []) if r.get("overlay")}
                cols.append((c["method"], recs))
        rows = sorted({i for _, recs in cols for i in recs})
        if not rows or not cols:
            continue
        fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.3 * len(cols), 2.7 * len(rows)), dpi=100,
                                 squeeze=False)
        for r, idx in enumerate(rows):
            img = np.asarray(Image.open(img_dir / f"{idx}.png").convert("RGB")).astype(np.float32) / 255
            h, w = img.shape[:2]
            question = (img_dir / f"{idx}.txt").read_text() if (img_dir / f"{idx}.txt").exists() else ""
            for c, (method, recs) in enumerate(cols):
                ax = axes[r][c]
                ax.axis("off")
                rec = recs.get(idx)
                if rec is None:
                    continue
                ax.imshow(_overlay(img, rec, h, w))
                drawn = _token_set(rec)
                n_kept = len(set(drawn) & set(rec["kept"]))
                title = f"{method}{'' if method == 'none' else f' @{b:g}'}\n{n_kept}/{len(drawn)} kept"
                ax.set_title(title, fontsize=8)
                if c == 0:
                    ax.text(0, h + 4, question[:60], fontsize=6, va="top")
        fig.tight_layout()
        path = out / "overlays" / f"{task}_overlays.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _token_set(rec: dict[str, Any]) -> list[int]:
    """Tokens drawn: the anyres tiles when there are any (finest grid, LLaVA-NeXT), else the base grid."""
    tiles = [i for i, t in enumerate(rec["tile"]) if t > 0]
    return tiles or [i for i, t in enumerate(rec["tile"]) if t == 0]


def _overlay(img, rec: dict[str, Any], h: int, w: int):
    """The image dimmed where drawn tokens were dropped (newline / CLS tokens are not drawn)."""
    import numpy as np

    idx = _token_set(rec)
    ys = sorted({round(rec["y"][i], 6) for i in idx})
    xs = sorted({round(rec["x"][i], 6) for i in idx})
    rows, cols = max(1, len(ys)), max(1, len(xs))
    y_of, x_of = {v: k for k, v in enumerate(ys)}, {v: k for k, v in enumerate(xs)}
    keep = np.zeros((rows, cols), dtype=bool)
    seen = np.zeros((rows, cols), dtype=bool)
    kept = set(rec["kept"])
    for i in idx:
        r, c = y_of[round(rec["y"][i], 6)], x_of[round(rec["x"][i], 6)]
        seen[r, c] = True
        keep[r, c] = keep[r, c] or i in kept
    yy = np.minimum((np.arange(h) * rows) // h, rows - 1)
    xx = np.minimum((np.arange(w) * cols) // w, cols - 1)
    mask = keep[yy][:, xx] | ~seen[yy][:, xx]
    out = img.copy()
    out[~mask] = out[~mask] * 0.25 + np.array([0.0, 0.0, 0.15])
    edge = np.zeros((h, w), dtype=bool)  # outline the kept cells
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edge[1:, :] |= mask[1:, :] != mask[:-1, :]
    out[edge] = [1.0, 0.85, 0.0]
    return out


def write_reports(results: dict[str, Any], out: Path) -> list[Path]:
    """results.md, and (with matplotlib) plots/*.png and overlays/*.png. Returns the paths written."""
    out = Path(out)
    (out / "results.md").write_text(markdown(results))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("no plots or overlays: matplotlib is missing (pip install 'tokenprune-vlm[eval]')")
        return [out / "results.md"]
    return [out / "results.md", *plots(results, out / "plots"), *overlays(out, results)]
