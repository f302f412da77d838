"""Vision-stage methods (issue #5) on the shapes fixtures: ToMe on the ViT classifier, Expedit clustering
on the vision encoders, HiRED / VisionZip / ToMe-in-tower on the fixture VLMs.

* ``vit_tome``: count accuracy of ``tokenprune.demo.load("vit")`` (label = number of shapes) and encoder MACs
  at ToMe budgets 0.25 / 0.5 / 0.75 (mean over encoder layers of the patch tokens entering a layer). Where one
  bipartite matching per layer cannot reach a budget (below about 2 / depth), the ``rounds`` extension is used
  and the row says so.
* ``cluster``: cosine similarity of the reconstructed final patch features to the unpruned ones (mean and
  5th percentile over patches), realised budget and MACs, at three cluster counts, on the ViT fixture's encoder
  and on the LLaVA fixture's CLIP tower used standalone.
* ``vlm``: per-question-type accuracy (``tokenprune.demo.score``, greedy, 12 new tokens) at budgets 0.1 / 0.2 /
  0.35 / 0.5 — HiRED and VisionZip on LLaVA-NeXT (HiRED's partitions), LLaVA-1.5 and Qwen2.5-VL (windowed,
  CLS-free tower: received-attention scores; mixed-aspect images), ToMe inside LLaVA-1.5's tower — with the
  realised budget and prefill MACs per sample (``tokenprune.flops.estimate``).

MACs (multiply-accumulates; FLOPs = 2 x MACs) follow ``tokenprune/flops.py``: per encoder layer on n tokens
``4 n d^2 + 2 n^2 d + 2 n d m``, plus the patch embedding, counting the CLS token. Method overheads are listed
separately: ToMe's matching ``|A| |B| d_head`` per merge; clustering ``(2 iters + 2) P K d`` (distances and
centre updates per k-means round, reconstruction distances and weighted sum); ``measured`` is torch's
``FlopCounterMode`` on one image of the patched run (everything the hooks execute, including scores recomputed
from the captured layer inputs), halved to MACs. ToMe runs in both placements: ``input`` (the engine's default:
merge at the next layer's input, after the MLP) and ``mid`` (ToMe's: between attention and MLP, so the merging
layer's MLP skips the merged tokens: ``r * 2 d m`` MACs less per merge).

``python evals/vision_methods.py --n 200 --out results/vision_methods`` (writes ``.json`` and ``.md``).
Missing fixture checkpoints are reported and skipped; ``--untrained`` runs the fixture architectures with random
weights (plumbing and MACs only; accuracies are meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tokenprune  # noqa: E402
from tokenprune.demo import KINDS, build, fixture_shapes, load, prompt, score, shapes  # noqa: E402
from tokenprune.errors import BudgetError  # noqa: E402
from tokenprune.flops import DecoderGeometry, estimate, flop_counter, layer_macs  # noqa: E402

VIT_BUDGETS = (0.25, 0.5, 0.75)
VLM_BUDGETS = (0.1, 0.2, 0.35, 0.5)
CLUSTERS = (100, 49, 25)


# ------------------------------------------------------------------------------------------ models


def fixture(kind: str, untrained: bool) -> tuple[Any, Any]:
    """The bundled fixture, or (``untrained``) a random-weight model of the same architecture."""
    return build.untrained(kind) if untrained else load(kind)


def geometry(cfg: Any) -> DecoderGeometry:
    heads = int(cfg.num_attention_heads)
    return DecoderGeometry(hidden=int(cfg.hidden_size), ffn=int(cfg.intermediate_size), heads=heads, kv_heads=heads,
                           head_dim=int(cfg.hidden_size) // heads, layers=int(cfg.num_hidden_layers), gated=False)


def encoder_macs(cfg: Any, patches_per_layer: list[float], cls: bool) -> float:
    """Patch embedding + encoder layers, ``patches_per_layer[j]`` patch tokens entering layer j (+ CLS)."""
    geo = geometry(cfg)
    n_patch = (int(cfg.image_size) // int(cfg.patch_size)) ** 2
    embed = n_patch * int(getattr(cfg, "num_channels", 3)) * int(cfg.patch_size) ** 2 * geo.hidden
    return float(embed + sum(layer_macs(geo, n + int(cls)) for n in patches_per_layer))


def measured_macs(model: Any, **inputs: Any) -> float:
    with flop_counter() as counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops() / 2


# ------------------------------------------------------------------------------------------ ViT + ToMe


def vit_pixels(proc: Any, examples: list[dict]) -> torch.Tensor:
    return proc([ex["image"] for ex in examples], return_tensors="pt")["pixel_values"]


def patch_any_rounds(model: Any, method: str, budget: float, **params: Any) -> tuple[Any, int]:
    """Patch with ToMe's one matching per layer, or the fewest ``rounds`` that reach ``budget``."""
    for rounds in range(1, 6):
        try:
            return tokenprune.patch(model, method, budget=budget, rounds=rounds, **params), rounds
        except BudgetError:
            continue
    raise BudgetError(f"budget: {budget} not reachable by {method} even with 5 rounds")


@torch.no_grad()
def eval_vit_tome(model: Any, proc: Any, examples: list[dict], bs: int) -> list[dict]:
    cfg = model.config
    n_patch = (cfg.image_size // cfg.patch_size) ** 2
    labels = [str(len(ex["objects"])) for ex in examples]
    rows = []
    for budget, placement in [(1.0, "input")] + [(b, p) for b in VIT_BUDGETS for p in ("input", "mid")]:
        try:
            handle, rounds = ((None, 1) if budget == 1.0
                              else patch_any_rounds(model, "tome", budget, placement=placement))
        except BudgetError as err:
            rows.append({"budget": budget, "placement": placement, "error": str(err)})
            print("  vit tome", rows[-1], flush=True)
            continue
        correct, realised = [], []
        for i in range(0, len(examples), bs):
            px = vit_pixels(proc, examples[i:i + bs])
            pred = model(pixel_values=px).logits.argmax(-1)
            correct += [cfg.id2label[int(p)] == y for p, y in zip(pred, labels[i:i + bs])]
            if handle is not None:
                realised.append(handle.trace.realized_budget)
        per_layer = handle.trace.visual_tokens_per_layer if handle else [float(n_patch)] * cfg.num_hidden_layers
        merged = [a - b for a, b in zip(per_layer[:-1], per_layer[1:])]
        overhead = sum((n + 1) // 2 * (n // 2) * (cfg.hidden_size // cfg.num_attention_heads)
                       for n, r in zip(per_layer[:-1], merged) if r > 0)
        mid_saving = sum(r * 2 * cfg.hidden_size * cfg.intermediate_size for r in merged)
        macs = encoder_macs(cfg, per_layer, cls=True) - (mid_saving if placement == "mid" else 0)
        rows.append({
            "budget": budget, "placement": placement, "rounds": rounds,
            "realised": round(float(np.mean(realised)) if realised else 1.0, 4),
            "accuracy": round(100 * float(np.mean(correct)), 1), "tokens_per_layer": per_layer,
            "encoder_MMACs": round(macs / 1e6, 2), "overhead_MMACs": round(overhead / 1e6, 3),
            "measured_MMACs": round(measured_macs(model, pixel_values=vit_pixels(proc, examples[:1])) / 1e6, 2),
        })
        if handle is not None:
            handle.remove()
        print("  vit tome", rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------ clustering


@torch.no_grad()
def eval_cluster(name: str, encoder: Any, pixels: torch.Tensor, alpha: int, beta: int, bs: int) -> list[dict]:
    """Cosine similarity of the final patch features with and without clustering, per setting."""
    cfg = encoder.config
    n_patch = (cfg.image_size // cfg.patch_size) ** 2

    def final(px: torch.Tensor) -> torch.Tensor:
        out = encoder(pixel_values=px).last_hidden_state
        return out[:, out.shape[1] - n_patch:]

    ref = torch.cat([final(pixels[i:i + bs]) for i in range(0, len(pixels), bs)])
    rows = []
    for clusters in CLUSTERS:
        with tokenprune.patch(encoder, "cluster", alpha=alpha, beta=beta, clusters=clusters) as handle:
            got = torch.cat([final(pixels[i:i + bs]) for i in range(0, len(pixels), bs)])
            per_layer = handle.trace.visual_tokens_per_layer
            k = int(handle.trace.stages[0].counts[0])
            measured = measured_macs(encoder, pixel_values=pixels[:1])
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1).flatten()
        overhead = (2 * 3 + 2) * n_patch * k * cfg.hidden_size
        rows.append({
            "encoder": name, "alpha": alpha, "beta": beta, "clusters": k,
            "realised": round(handle.trace.realized_budget, 4),
            "cos_mean": round(float(cos.mean()), 4), "cos_p05": round(float(cos.quantile(0.05)), 4),
            "encoder_MMACs": round(encoder_macs(cfg, per_layer, cls=name != "siglip") / 1e6, 2),
            "unpruned_MMACs": round(encoder_macs(cfg, [float(n_patch)] * cfg.num_hidden_layers, True) / 1e6, 2),
            "overhead_MMACs": round(overhead / 1e6, 3), "measured_MMACs": round(measured / 1e6, 2),
        })
        print("  cluster", rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------ VLMs


@torch.no_grad()
def eval_vlm(model: Any, proc: Any, examples: list[dict], method: str | None, budget: float, bs: int,
             kind: str) -> dict:
    tok = proc.tokenizer
    tok.padding_side = "left"
    res: dict[str, list[float]] = defaultdict(list)
    realised, macs = [], []
    rounds = None
    handle = None
    if method == "tome":
        handle, rounds = patch_any_rounds(model, "tome", budget)
    elif method is not None:
        handle = tokenprune.patch(model, method, budget=budget)
    try:
        for i in range(0, len(examples), bs):
            ch = examples[i:i + bs]
            inp = proc(images=[ex["image"] for ex in ch], text=[prompt(ex["question"], kind) for ex in ch],
                       return_tensors="pt", padding=True)
            gen = model.generate(**inp, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
            trace = handle.trace if handle is not None else None
            realised.append(trace.realized_budget if trace is not None else 1.0)
            macs += [f.prefill_total for f in estimate(model, inp, trace)]
            for ex, g in zip(ch, gen):
                res[ex["kind"]].append(score(ex["kind"], tok.decode(g[inp["input_ids"].shape[1]:],
                                                                      skip_special_tokens=True), ex))
    finally:
        if handle is not None:
            handle.remove()
    acc = {k: round(100 * float(np.mean(res[k])), 1) for k in KINDS if k in res}
    acc["mean"] = round(float(np.mean(list(acc.values()))), 1)
    return {"method": method or "unpruned", "budget": budget, "rounds": rounds,
            "realised": round(float(np.mean(realised)), 4), "prefill_GMACs": round(float(np.mean(macs)) / 1e9, 4),
            **acc}


VLM_PLAN = {"llava": ("hired", "visionzip", "tome"), "llava_next": ("hired", "visionzip"),
            "qwen2_5_vl": ("hired", "visionzip")}  # ToMe is refused inside Qwen's packed tower


# ------------------------------------------------------------------------------------------ report


def markdown(out: dict) -> str:
    lines = [f"# Vision-stage methods on the shapes fixtures (n = {out['n']}, {out['weights']} weights)", ""]
    for key, err in out.get("skipped", {}).items():
        lines.append(f"- skipped {key}: {err}")
    if out.get("vit_tome"):
        lines += ["", "## ToMe on the ViT classifier (count accuracy, encoder MMACs per image)", "",
                  "| budget | placement | rounds | realised | accuracy % | encoder MMACs | +matching | measured |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in out["vit_tome"]:
            if "error" in r:
                lines.append(f"| {r['budget']} | {r['placement']} | unreachable: {r['error']} ||||||")
                continue
            lines.append(f"| {r['budget']} | {r['placement']} | {r['rounds']} | {r['realised']} | {r['accuracy']} | "
                         f"{r['encoder_MMACs']} | {r['overhead_MMACs']} | {r['measured_MMACs']} |")
    if out.get("cluster"):
        lines += ["", "## Clustering + reconstruction (final patch features vs unpruned)", "",
                  "| encoder | alpha..beta | clusters | realised | cos mean | cos p5 | MMACs (unpruned) | +cluster | "
                  "measured |", "|---|---|---|---|---|---|---|---|---|"]
        for r in out["cluster"]:
            lines.append(f"| {r['encoder']} | {r['alpha']}..{r['beta']} | {r['clusters']} | {r['realised']} | "
                         f"{r['cos_mean']} | {r['cos_p05']} | {r['encoder_MMACs']} ({r['unpruned_MMACs']}) | "
                         f"{r['overhead_MMACs']} | {r['measured_MMACs']} |")
    for kind in VLM_PLAN:
        rows = out.get("vlm", {}).get(kind)
        if not rows:
            continue
        lines += ["", f"## {kind}: accuracy % per question type", "",
                  "| method | budget | realised | " + " | ".join(KINDS) + " | mean | prefill GMACs |",
                  "|---|---|---|" + "---|" * len(KINDS) + "---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['budget']} | unreachable: {r['error']} |" + "|" * (len(KINDS) + 2))
                continue
            name = r["method"] + (f" (rounds={r['rounds']})" if r.get("rounds") and r["rounds"] > 1 else "")
            lines.append(f"| {name} | {r['budget']} | {r['realised']} | "
                         + " | ".join(str(r.get(k, "")) for k in KINDS) + f" | {r['mean']} | {r['prefill_GMACs']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--bs", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parts", default="vit,cluster,llava,llava_next,qwen2_5_vl")
    ap.add_argument("--untrained", action="store_true", help="random-weight fixture architectures (plumbing, MACs)")
    ap.add_argument("--out", default="results/vision_methods")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    parts = args.parts.split(",")
    examples = shapes("test", args.n, seed=0)
    out: dict[str, Any] = {"n": args.n, "weights": "random" if args.untrained else "trained", "skipped": {},
                           "vlm": {}}
    models: dict[str, tuple[Any, Any]] = {}
    for kind in ("vit", *VLM_PLAN):
        try:
            models[kind] = fixture(kind, args.untrained)
        except FileNotFoundError as err:
            out["skipped"][kind] = str(err)
            print(f"skip {kind}: {err}", flush=True)
    if "vit" in parts and "vit" in models:
        out["vit_tome"] = eval_vit_tome(*models["vit"], examples, args.bs)
    if "cluster" in parts:
        out["cluster"] = []
        if "vit" in models:
            model, proc = models["vit"]
            out["cluster"] += eval_cluster("vit", model.vit, vit_pixels(proc, examples), 4, 9, args.bs)
        if "llava" in models:
            model, proc = models["llava"]
            px = proc.image_processor([ex["image"] for ex in examples], return_tensors="pt")["pixel_values"]
            out["cluster"] += eval_cluster("clip (llava tower)", model.model.vision_tower, px, 1, 2, args.bs)
    for kind in VLM_PLAN:
        if kind not in parts or kind not in models:
            continue
        model, proc = models[kind]
        examples = fixture_shapes(kind, "test", args.n)
        rows = [eval_vlm(model, proc, examples, None, 1.0, args.bs, kind)]
        print(f"  {kind}", rows[-1], flush=True)
        for method in VLM_PLAN[kind]:
            for budget in VLM_BUDGETS:
                try:
                    rows.append(eval_vlm(model, proc, examples, method, budget, args.bs, kind))
                except BudgetError as err:
                    rows.append({"method": method, "budget": budget, "error": str(err), "realised": None,
                                 "prefill_GMACs": None, "mean": None})
                print(f"  {kind}", rows[-1], flush=True)
        out["vlm"][kind] = rows
    out["wall_s"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(out, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
