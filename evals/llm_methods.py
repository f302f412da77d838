"""LLM-stage methods on the bundled shapes fixture (issue #4): accuracy per question kind for the
unpruned model, random, uniform, FastV, PyramidDrop and FEATHER at several budgets, plus FEATHER's
finding: the share of kept visual tokens in the top half of the image. Issue #21 adds DivPrune, Pool,
DART, VisPruner and CDPruner (its LLM-embedding relevance: the fixtures have no CLIP text tower) and
the prefill MACs per sample of every row (``tokenprune.flops.estimate``: the model's own compute with
the trace's visual tokens per layer; the methods' selection overhead is not included).

Every method runs with its defaults (nothing is tuned here): random and uniform before the LLM,
FastV K = 2, PyramidDrop with renumbered positions (its official convention) and, as a second row,
with original positions, FEATHER with original positions (its official convention) and, as a second
row, with renumbered ones. ``budget`` has one meaning for all of them (the mean over decoder layers
of the visual tokens entering a layer, over the unpruned count); a budget a method cannot reach on
this model (e.g. 0.1 on an 8-layer LLM, whose first layer always sees every token) is reported as
unreachable, with the library's message.

Top-half share: for every kept set in the trace, the fraction of its patch tokens whose centre lies
in the top half of the image (``y < 0.5`` in the adapter's layout; newline tokens excluded), averaged
over examples; 0.5 for the unpruned model. Reported for each method's first and last stage.

    python evals/llm_methods.py --kind llava --n 500 --out results/llm_methods
    python evals/llm_methods.py --kind llava --n 500 --only divprune,pool,dart,vispruner,cdpruner --no-paper \
        --out results/llm_methods_llava_2025          # some rows only (plus unpruned)
    python evals/llm_methods.py --untrained --n 20 --out /tmp/llm_methods_smoke   # plumbing check only

writes ``<out>.json`` and ``<out>.md``. Exits with status 2 and a message when the fixture checkpoint
does not exist yet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tokenprune  # noqa: E402
from tokenprune.adapters import anatomy_of  # noqa: E402
from tokenprune.demo import MODEL_KINDS, fixture_shapes, load, prompt, score  # noqa: E402
from tokenprune.demo.build import untrained  # noqa: E402
from tokenprune.demo.generator import KINDS  # noqa: E402
from tokenprune.errors import BudgetError, TokenPruneError  # noqa: E402
from tokenprune.flops import estimate  # noqa: E402

# (row label, method, parameters); budgets are added per run
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("random", "random", {}),
    ("uniform", "uniform", {}),
    ("fastv", "fastv", {}),
    ("pdrop", "pdrop", {}),
    ("pdrop (keep positions)", "pdrop", {"positions": "keep"}),
    ("feather", "feather", {}),
    ("feather (renumber positions)", "feather", {"positions": "renumber"}),
    ("divprune", "divprune", {}),
    ("pool", "pool", {}),
    ("dart", "dart", {}),
    ("vispruner", "vispruner", {}),
    ("cdpruner", "cdpruner", {}),
]
# the papers' own settings (explicit parameters, depth-scaled layers; budget unused, realised reported)
PAPER: list[tuple[str, str, dict[str, Any]]] = [
    ("fastv paper (K=2, R=50%)", "fastv", {"k": 2, "r": 0.5}),
    ("pdrop paper (λ=0.5)", "pdrop", {"lam": 0.5}),
    ("feather paper (30% + grid, 9%)", "feather", {"keep": 0.3}),
]
MAX_NEW = 12


class Geometry:
    """``y`` of every visual token of a sample (NaN for newline/CLS tokens), from the adapter."""

    def __init__(self, model: Any) -> None:
        self.anatomy = anatomy_of(model)
        self.cache: dict[tuple, torch.Tensor] = {}

    def y(self, n: int, geometry: dict[str, torch.Tensor]) -> torch.Tensor:
        """``geometry``: the sample's own ``image_sizes`` (LLaVA-NeXT) / ``image_grid_thw`` (Qwen) rows."""
        key = (n, *((k, tuple(v.flatten().tolist())) for k, v in sorted(geometry.items())))
        if key not in self.cache:
            (lay,) = self.anatomy.layouts([n], {"image_sizes": None, **geometry})
            self.cache[key] = torch.where(lay.tile >= 0, lay.y, torch.nan)
        return self.cache[key]


def top_half_share(kept: torch.Tensor, y: torch.Tensor) -> float:
    """Share of the patch tokens in ``kept`` (original visual indices, -1 padded) with y < 0.5."""
    ys = y[kept[kept >= 0]]
    ys = ys[~torch.isnan(ys)]
    return float((ys < 0.5).float().mean()) if ys.numel() else float("nan")


@torch.no_grad()
def run(model: Any, proc: Any, examples: list[dict], bs: int, label: str, method: str | None,
        params: dict[str, Any], budget: float | None, geometry: Geometry, kind: str) -> dict[str, Any]:
    """Greedy answers for all ``examples`` under one configuration; accuracy per kind, realised
    budget, stage layers and top-half shares. A configuration the library refuses on this model (a
    typed error at ``patch()``) is reported with its message."""
    tok = proc.tokenizer
    image_id = model.config.image_token_id
    per_kind: dict[str, list[float]] = defaultdict(list)
    realized, top_first, top_last, layers, samples, macs, info = [], [], [], None, [], [], {}
    handle = None
    if method is not None:
        try:
            handle = tokenprune.patch(model, method, budget=budget, **params)
        except BudgetError as e:
            return {"label": label, "method": method, "params": params, "budget": budget, "unreachable": str(e)}
        except TokenPruneError as e:
            return {"label": label, "method": method, "params": params, "budget": budget, "refused": str(e)}
    t0 = time.time()
    try:
        for i in range(0, len(examples), bs):
            chunk = examples[i:i + bs]
            inputs = proc(images=[ex["image"] for ex in chunk], text=[prompt(ex["question"], kind) for ex in chunk],
                          return_tensors="pt", padding=True)
            out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
            preds = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for ex, pred in zip(chunk, preds, strict=True):
                per_kind[ex["kind"]].append(score(ex["kind"], pred, ex))
            if len(samples) < 5:
                samples.extend({"q": ex["question"], "answer": ex["answer"], "pred": p.strip()}
                               for ex, p in zip(chunk[:5], preds[:5], strict=True))
            macs += [f.prefill_total for f in estimate(model, inputs, handle.trace if handle else None)]
            if handle is None:
                continue
            trace = handle.trace
            info = {st.name: st.info for st in trace.stages if st.info}
            realized.append((trace.realized_budget, len(chunk)))
            stages = trace.stages
            layers = [(st.name, st.site, st.layer) for st in stages]
            n_vis = (inputs["input_ids"] == image_id).sum(-1)
            for b in range(len(chunk)):
                y = geometry.y(int(n_vis[b]), {k: inputs[k][b:b + 1] for k in ("image_sizes", "image_grid_thw")
                                               if k in inputs})
                top_first.append(top_half_share(stages[0].kept[b], y))
                top_last.append(top_half_share(stages[-1].kept[b], y))
    finally:
        if handle is not None:
            handle.remove()
    acc = {k: round(100 * float(np.mean(per_kind[k])), 1) for k in KINDS if per_kind[k]}
    acc["mean"] = round(float(np.mean(list(acc.values()))), 1)
    res: dict[str, Any] = {"label": label, "method": method, "params": params, "budget": budget, "accuracy": acc,
                           "wall_s": round(time.time() - t0, 1), "samples": samples[:5],
                           "prefill_GMACs": round(float(np.mean(macs)) / 1e9, 4)}
    if info:
        res["info"] = info
    if handle is not None:
        res["realized_budget"] = round(sum(r * n for r, n in realized) / sum(n for _, n in realized), 4)
        res["stages"] = layers
        res["top_half_first_stage"] = round(float(np.nanmean(top_first)), 3)
        res["top_half_last_stage"] = round(float(np.nanmean(top_last)), 3)
    return res


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    head = ["method", "budget", "realised", *KINDS, "mean", "prefill GMACs", "top-half kept (first / last stage)",
            "stages"]
    lines = [f"# LLM-stage methods on the shapes fixture ({meta['kind']}, {meta['n']} test examples)", "",
             f"checkpoint: `{meta['checkpoint']}`; visual tokens per image: {meta['n_visual']}; "
             f"LLM layers: {meta['llm_layers']}; accuracy in % (box: IoU >= 0.5).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        budget = "-" if r["budget"] is None else f"{r['budget']:g}"
        why = next((w for w in ("unreachable", "refused") if w in r), None)
        if why:
            lines.append(f"| {r['label']} | {budget} | {why} | " + " | ".join("" for _ in KINDS)
                         + f" | | | | {r[why]} |")
            continue
        acc = r["accuracy"]
        stages = ", ".join(f"{name}@{layer}" for name, _, layer in r.get("stages") or [])
        top = (f"{r['top_half_first_stage']:.2f} / {r['top_half_last_stage']:.2f}"
               if "top_half_first_stage" in r else "0.50")
        realized = f"{r['realized_budget']:.3f}" if "realized_budget" in r else "1"
        lines.append(f"| {r['label']} | {budget} | {realized} | " + " | ".join(f"{acc.get(k, float('nan')):.1f}"
                                                                          for k in KINDS)
                     + f" | {acc['mean']:.1f} | {r.get('prefill_GMACs', '')} | {top} | {stages} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="llava", choices=[k for k in MODEL_KINDS if k != "vit"])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", default="0.1,0.2,0.35,0.5")
    ap.add_argument("--bs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt", default="", help="checkpoint folder (default: the bundled fixture)")
    ap.add_argument("--untrained", action="store_true", help="random weights, same architecture (plumbing check)")
    ap.add_argument("--only", default="", help="comma-separated row labels to run (default: all; unpruned always)")
    ap.add_argument("--no-paper", action="store_true", help="skip the paper-setting rows")
    ap.add_argument("--out", default="results/llm_methods")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.untrained:
        model, proc, ckpt = *untrained(args.kind, args.seed), "untrained (random weights)"
    else:
        try:
            model, proc = load(args.kind, path=args.ckpt or None)
        except FileNotFoundError as e:
            print(f"no fixture checkpoint yet: {e}\n"
                  f"(train it with evals/fixtures/train_{args.kind}.py, or pass --ckpt)")
            sys.exit(2)
        ckpt = args.ckpt or "bundled"
    proc.tokenizer.padding_side = "left"
    model.set_attn_implementation("sdpa")
    examples = fixture_shapes(args.kind, "test", args.n, args.seed)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    only = set(filter(None, args.only.split(",")))
    unknown = only - {label for label, _, _ in CONFIGS}
    if unknown:
        sys.exit(f"--only: unknown labels {sorted(unknown)}")
    geometry = Geometry(model)
    probe = proc(images=[examples[0]["image"]], text=[prompt(examples[0]["question"], args.kind)],
                 return_tensors="pt")
    meta = {"kind": args.kind, "n": args.n, "seed": args.seed, "checkpoint": ckpt, "only": sorted(only),
            "n_visual": int((probe["input_ids"] == model.config.image_token_id).sum()),
            "llm_layers": model.config.text_config.num_hidden_layers, "threads": args.threads}
    rows = [run(model, proc, examples, args.bs, "unpruned", None, {}, None, geometry, args.kind)]
    print(json.dumps(rows[-1]["accuracy"]), flush=True)
    for label, method, params in [] if args.no_paper else PAPER:
        rows.append(run(model, proc, examples, args.bs, label, method, params, None, geometry, args.kind))
        r = rows[-1]
        print(f"{label:30s}", r.get("refused") or f"{r['accuracy']} {r['realized_budget']}", flush=True)
    for budget in budgets:
        for label, method, params in CONFIGS:
            if only and label not in only:
                continue
            rows.append(run(model, proc, examples, args.bs, label, method, params, budget, geometry, args.kind))
            r = rows[-1]
            print(f"{label:30s} b={budget:<5g}", r.get("unreachable") or r.get("refused") or
                  f"{r['accuracy']}  realised {r['realized_budget']}  top-half {r['top_half_last_stage']}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown(meta, rows))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
