"""Early exit on the fixtures: accuracy, layers used, measured speed-ups beside FLOPs-ideal ratios.

* **LLaVA fixture** (``tokenprune.demo.load("llava")``): for the unpatched model, ``threshold=None``
  (only the unread last CLIP layer skipped) and each decode ``threshold`` (MuE cosine criterion from
  ``--min-layer`` on): accuracy per question kind on the shapes benchmark, mean decoder layers per
  decoded token (decode steps; tokens after a sample's EOS are not counted), and at batch size 1 the
  decode time per token (``(generate - prefill) / (new tokens - 1)``) and the encode time
  (``get_image_features``), each as a speed-up over the unpatched model next to the FLOPs-ideal
  ratio (analytic MACs, ``tokenprune.flops.layer_macs``: decoder layers at the real context length,
  LM head, and the K/V projections that fill skipped layers; encoder layers, patch embedding and
  projector). Also the mean decode similarity per layer, to place thresholds.
* **ViT fixture** (``tokenprune.demo.load("vit")`` + ``exit_heads.safetensors`` next to it, trained by
  ``python -m tokenprune.early_exit_heads``): accuracy and mean exit layer per confidence threshold,
  accuracy of every exit head alone, batch-1 time per image as a speed-up beside the FLOPs-ideal
  ratio (layers run + the exit heads evaluated on the way).

``--tiny`` runs the same pipeline on the random tiny test models (numbers meaningless; a smoke test).

``python evals/bench_early_exit.py --out results/early_exit``  (writes ``.json`` and ``.md``)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tokenprune  # noqa: E402
from tokenprune.demo import KINDS, prompt, score, shapes  # noqa: E402
from tokenprune.flops import DecoderGeometry, layer_macs  # noqa: E402


def _timed(fn) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


# -- LLaVA -------------------------------------------------------------------------------------
def load_llava(tiny: bool, path: str | None):
    if tiny:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        import tiny as T

        model, proc = T.llava()
        return model, proc
    return tokenprune.demo.load("llava", path)


def _valid_steps(gen: torch.Tensor, eos: int | None, pad: int | None) -> torch.Tensor:
    """(B, n-1) bool: decode step s (producing token s+1) belongs to the answer (no EOS before)."""
    ended = torch.zeros_like(gen, dtype=torch.bool)
    if eos is not None:
        ended = (gen == eos).cumsum(1) > 0
    return ~ended[:, :-1]


@torch.no_grad()
def decode_similarity_profile(model, proc, examples: list[dict]) -> list[float]:
    """Mean cosine similarity between each decoder layer's input and output on decode steps."""
    layers = model.model.language_model.layers
    sums = defaultdict(list)
    handles = [
        lay.register_forward_hook(
            lambda m, a, o, j=j: sums[j].append(float(F.cosine_similarity(a[0][:, -1].float(), o[:, -1].float(), -1)
                                                      .mean())) if a[0].shape[1] == 1 else None)
        for j, lay in enumerate(layers)
    ]
    try:
        for ex in examples:
            inp = proc(images=[ex["image"]], text=[prompt(ex["question"])], return_tensors="pt")
            model.generate(**inp, max_new_tokens=8, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    return [round(statistics.mean(sums[j]), 4) if sums[j] else None for j in range(len(layers))]


def _patch(model, threshold, args):
    if threshold == "baseline":
        return None
    return tokenprune.patch(model, "early_exit", threshold=threshold, min_layer=args.min_layer,
                            vision_threshold=args.vision_threshold)


@torch.no_grad()
def llava_accuracy(model, proc, examples, threshold, args) -> dict[str, Any]:
    tok = proc.tokenizer
    tok.padding_side = "left"
    eos, pad = tok.eos_token_id, tok.pad_token_id
    res: dict[str, list[float]] = defaultdict(list)
    layer_sum = layer_cnt = 0.0
    handle = _patch(model, threshold, args)
    n_layers = model.config.text_config.num_hidden_layers
    try:
        for i in range(0, len(examples), args.bs):
            ch = examples[i:i + args.bs]
            inp = proc(images=[ex["image"] for ex in ch], text=[prompt(ex["question"]) for ex in ch],
                       return_tensors="pt", padding=True)
            out = model.generate(**inp, max_new_tokens=args.max_new, do_sample=False, pad_token_id=pad)
            gen = out[:, inp["input_ids"].shape[1]:]
            for ex, g in zip(ch, gen, strict=True):
                res[ex["kind"]].append(score(ex["kind"], tok.decode(g, skip_special_tokens=True), ex))
            valid = _valid_steps(gen, eos, pad)
            rec = handle.trace.early_exit if handle is not None and handle.trace is not None else None
            lpt = rec.layers_per_token if rec is not None and rec.decode else None
            if lpt is None or lpt.numel() == 0:
                lpt = torch.full(valid.shape, n_layers)
            steps = min(lpt.shape[1], valid.shape[1])
            v = valid[:, :steps]
            layer_sum += float(lpt[:, :steps][v].sum())
            layer_cnt += float(v.sum())
    finally:
        if handle is not None:
            handle.remove()
    acc = {k: round(100 * statistics.mean(res[k]), 1) for k in KINDS if res[k]}
    acc["mean"] = round(statistics.mean(acc.values()), 1)
    return {"accuracy": acc, "mean_decode_layers": round(layer_sum / max(layer_cnt, 1), 3),
            "decode_tokens": int(layer_cnt)}


@torch.no_grad()
def llava_timing(model, proc, examples, configs: dict[str, Any], args) -> dict[str, dict[str, Any]]:
    """Batch 1, configs interleaved round by round (a loaded machine drifts): median encode time,
    median decode time per token; FLOPs-ideal MACs alongside."""
    tok = proc.tokenizer
    core = model.model
    text = DecoderGeometry.from_config(model.config.text_config)
    vcfg = model.config.vision_config
    vis = DecoderGeometry.from_config(vcfg, gated=False)
    n_tok = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
    embed = n_tok * 3 * vcfg.patch_size ** 2 * vcfg.hidden_size
    proj = (n_tok - 1) * (vcfg.hidden_size * text.hidden + text.hidden * text.hidden)
    head = text.hidden * text.vocab
    per_v = layer_macs(vis, n_tok)
    enc_t: dict[str, list[float]] = defaultdict(list)
    dec_t: dict[str, list[float]] = defaultdict(list)
    macs: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])  # dec, base dec, enc, base enc
    inputs = [proc(images=[ex["image"]], text=[prompt(ex["question"])], return_tensors="pt") for ex in examples]
    for r in range(args.warmup + args.rounds):
        for name, threshold in configs.items():
            handle = _patch(model, threshold, args)
            try:
                for inp in inputs:
                    _, te = _timed(lambda inp=inp: core.get_image_features(pixel_values=inp["pixel_values"]))
                    _, tp = _timed(lambda inp=inp: model(**inp, use_cache=True, logits_to_keep=1))
                    out, tg = _timed(lambda inp=inp: model.generate(**inp, max_new_tokens=args.max_new,
                                                                    do_sample=False, pad_token_id=tok.pad_token_id))
                    if r < args.warmup:
                        continue
                    n_new = int(out.shape[1] - inp["input_ids"].shape[1])
                    enc_t[name].append(te)
                    if n_new > 1:
                        dec_t[name].append(max(tg - tp, 0.0) / (n_new - 1))
                    if r > args.warmup:
                        continue
                    rec = handle.trace.early_exit if handle is not None and handle.trace is not None else None
                    full = [text.layers] * (n_new - 1)
                    lpt = rec.layers_per_token[0].tolist() if rec is not None and rec.decode else full
                    m = macs[name]
                    for s, used in enumerate(lpt[: n_new - 1]):
                        per = layer_macs(text, 1, inp["input_ids"].shape[1] + s + 1)
                        m[0] += used * per + (text.layers - used) * text.hidden * 2 * text.d_kv + head
                        m[1] += text.layers * per + head
                    vl = rec.vision.tolist() if rec is not None and rec.vision is not None else [vis.layers]
                    m[2] += embed + proj + sum(vl) / len(vl) * per_v
                    m[3] += embed + proj + vis.layers * per_v
            finally:
                if handle is not None:
                    handle.remove()
    return {
        name: {
            "encode_s": statistics.median(enc_t[name]) if enc_t[name] else None,
            "decode_s_per_token": statistics.median(dec_t[name]) if dec_t[name] else None,
            "decode_ideal_ratio": round(macs[name][1] / macs[name][0], 3) if macs[name][0] else None,
            "encode_ideal_ratio": round(macs[name][3] / macs[name][2], 3) if macs[name][2] else None,
        }
        for name in configs
    }


def bench_llava(args) -> dict[str, Any]:
    try:
        model, proc = load_llava(args.tiny, args.llava_path)
    except FileNotFoundError as e:
        return {"status": f"fixture missing: {e}"}
    model.eval()
    examples = shapes("test", args.n, seed=0)
    out: dict[str, Any] = {"n": len(examples), "min_layer": args.min_layer,
                           "num_layers": model.config.text_config.num_hidden_layers,
                           "vision_layers": model.config.vision_config.num_hidden_layers}
    out["decode_similarity_per_layer"] = decode_similarity_profile(model, proc, examples[: args.profile_n])
    print("similarity", out["decode_similarity_per_layer"], flush=True)
    rows = {}
    configs: dict[str, Any] = {"unpatched": "baseline", "vision_skip_only": None}
    configs.update({f"thr{t:g}": t for t in args.thresholds})
    for name, thr in configs.items():
        row = llava_accuracy(model, proc, examples, thr, args)
        row["threshold"] = None if thr in ("baseline", None) else thr
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    for name, t in llava_timing(model, proc, examples[: args.time_n], configs, args).items():
        rows[name].update(t)
        print(name, json.dumps(t), flush=True)
    base = rows["unpatched"]
    for row in rows.values():
        row["decode_speedup"] = round(base["decode_s_per_token"] / row["decode_s_per_token"], 3) \
            if row.get("decode_s_per_token") else None
        row["encode_speedup"] = round(base["encode_s"] / row["encode_s"], 3) if row.get("encode_s") else None
    out["rows"] = rows
    return out


# -- ViT ---------------------------------------------------------------------------------------
def load_vit(tiny: bool, path: str | None):
    from tokenprune.early_exit_heads import HEADS_FILE, ExitHeads, shapes_batches, train_heads

    if tiny:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        import tiny as T
        from transformers import ViTImageProcessorPil

        model = T.vit()
        proc = ViTImageProcessorPil(size={"height": 32, "width": 32})
        heads = train_heads(model, shapes_batches(proc, 16), steps=20, lr=5e-3, log_every=0)
        return model, proc, heads
    model, proc = tokenprune.demo.load("vit", path)
    folder = tokenprune.demo.checkpoint_path("vit") if path is None else path
    heads_path = os.path.join(folder, HEADS_FILE)
    if not os.path.isfile(heads_path):
        raise FileNotFoundError(f"{heads_path} (train: python -m tokenprune.early_exit_heads)")
    return model, proc, ExitHeads.load(heads_path)


@torch.no_grad()
def bench_vit(args) -> dict[str, Any]:
    try:
        model, proc, heads = load_vit(args.tiny, args.vit_path)
    except FileNotFoundError as e:
        return {"status": f"fixture missing: {e}"}
    model.eval()
    cfg = model.config
    geo = DecoderGeometry.from_config(cfg, gated=False)
    n_tok = (cfg.image_size // cfg.patch_size) ** 2 + 1
    per_layer = layer_macs(geo, n_tok)
    embed = n_tok * 3 * cfg.patch_size ** 2 * cfg.hidden_size
    d, g = cfg.hidden_size, cfg.image_size // cfg.patch_size

    def head_macs(kind: str) -> float:
        if kind == "local":
            return (g * g) * (2 * d * d + 9 * d) + d * cfg.num_labels
        sr = int(kind[len("global"):] or 2)
        m = (-(-g // sr)) ** 2
        return m * 4 * d * d + 2 * m * m * d + d * cfg.num_labels

    hm = [head_macs(k) for k in heads.config["kinds"]]
    examples = shapes("test", args.vit_n, seed=0)
    labels = torch.tensor([len(ex["objects"]) - 1 for ex in examples])
    px = proc([ex["image"] for ex in examples], return_tensors="pt")["pixel_values"]
    out = model(pixel_values=px, output_hidden_states=True)
    per_exit = {f"exit_after_layer{p + 1}": round(100 * float((h(out.hidden_states[p + 1])[0].argmax(-1) == labels)
                                                             .float().mean()), 1)
                for p, h in zip(heads.positions, heads.heads)}
    per_exit["final"] = round(100 * float((out.logits.argmax(-1) == labels).float().mean()), 1)
    rows = {}
    t_px = px[: args.time_n]
    configs: dict[str, Any] = {"unpatched": "baseline"}
    configs.update({f"conf{t:g}": t for t in args.vit_thresholds})
    for name, thr in configs.items():
        handle = None if thr == "baseline" else tokenprune.patch(model, "early_exit", heads=heads, threshold=thr)
        try:
            chunks, used = [], []
            for i in range(0, len(px), args.bs):
                chunks.append(model(pixel_values=px[i:i + args.bs]).logits)
                rec = handle.trace.early_exit if handle is not None else None
                used += rec.classify.tolist() if rec is not None else [cfg.num_hidden_layers] * len(chunks[-1])
            logits = torch.cat(chunks)
        finally:
            if handle is not None:
                handle.remove()
        macs = [embed + u * per_layer + (sum(m for p, m in zip(heads.positions, hm) if p + 1 <= u)
                                         if thr != "baseline" else 0.0) for u in used]
        rows[name] = {"threshold": None if thr == "baseline" else thr,
                      "accuracy": round(100 * float((logits.argmax(-1) == labels).float().mean()), 1),
                      "mean_exit_layer": round(statistics.mean(used), 3), "macs": statistics.mean(macs)}
        print(name, json.dumps(rows[name]), flush=True)
    times: dict[str, list[float]] = defaultdict(list)
    for r in range(args.warmup + args.rounds):  # configs interleaved: a loaded machine drifts
        for name, thr in configs.items():
            handle = None if thr == "baseline" else tokenprune.patch(model, "early_exit", heads=heads, threshold=thr)
            try:
                for i in range(len(t_px)):
                    _, t = _timed(lambda i=i: model(pixel_values=t_px[i:i + 1]))
                    if r >= args.warmup:
                        times[name].append(t)
            finally:
                if handle is not None:
                    handle.remove()
    for name in configs:
        rows[name]["s_per_image_bs1"] = statistics.median(times[name])
    base = rows["unpatched"]
    for row in rows.values():
        row["speedup"] = round(base["s_per_image_bs1"] / row["s_per_image_bs1"], 3)
        row["ideal_ratio"] = round(base["macs"] / row["macs"], 3)
    return {"n": len(examples), "num_layers": cfg.num_hidden_layers, "exit_positions": heads.positions,
            "exit_kinds": heads.config["kinds"], "per_exit_accuracy": per_exit, "rows": rows}


# -- report ------------------------------------------------------------------------------------
def markdown(res: dict[str, Any]) -> str:
    lines = ["# Early exit (MuE decode / vision tower, LGViT heads)", ""]
    env = res["env"]
    lines += [f"torch {env['torch']}, {env['threads']} thread(s), {env['machine']}; tiny={env['tiny']}", ""]
    ll = res.get("llava")
    if ll is not None:
        lines += ["## LLaVA fixture", ""]
        if "rows" not in ll:
            lines += [ll.get("status", "not run"), ""]
        else:
            lines += [f"{ll['n']} shapes test examples; exits from layer {ll['min_layer']} of {ll['num_layers']}; "
                      f"mean decode similarity per layer: {ll['decode_similarity_per_layer']}", ""]
            head = "| config | " + " | ".join(KINDS) + " | mean | layers/decoded token | decode speed-up (ideal) " \
                   "| encode speed-up (ideal) |"
            lines += [head, "|" + "---|" * (len(KINDS) + 5)]
            for name, r in ll["rows"].items():
                acc = " | ".join(str(r["accuracy"].get(k, "")) for k in KINDS)
                lines.append(f"| {name} | {acc} | {r['accuracy']['mean']} | {r['mean_decode_layers']} | "
                             f"{r['decode_speedup']}x ({r['decode_ideal_ratio']}x) | "
                             f"{r['encode_speedup']}x ({r['encode_ideal_ratio']}x) |")
            lines.append("")
    vt = res.get("vit")
    if vt is not None:
        lines += ["## ViT fixture (LGViT exit heads)", ""]
        if "rows" not in vt:
            lines += [vt.get("status", "not run"), ""]
        else:
            lines += [f"{vt['n']} test images; exits after layers {[p + 1 for p in vt['exit_positions']]} "
                      f"({vt['exit_kinds']}) of {vt['num_layers']}; accuracy of each exit alone: "
                      f"{vt['per_exit_accuracy']}", "",
                      "| config | accuracy | mean exit layer | speed-up bs1 (ideal) |", "|---|---|---|---|"]
            for name, r in vt["rows"].items():
                lines.append(f"| {name} | {r['accuracy']} | {r['mean_exit_layer']} | {r['speedup']}x "
                             f"({r['ideal_ratio']}x) |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/early_exit")
    p.add_argument("--what", choices=["llava", "vit", "both"], default="both")
    p.add_argument("--tiny", action="store_true", help="random tiny test models (smoke test)")
    p.add_argument("--llava-path", default=None)
    p.add_argument("--vit-path", default=None)
    p.add_argument("--n", type=int, default=200, help="LLaVA accuracy examples")
    p.add_argument("--vit-n", type=int, default=500)
    p.add_argument("--time-n", type=int, default=20, help="examples timed at batch 1")
    p.add_argument("--profile-n", type=int, default=10)
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--max-new", type=int, default=12)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (configs interleaved)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.995, 0.99, 0.98, 0.95])
    p.add_argument("--min-layer", type=int, default=None)
    p.add_argument("--vision-threshold", type=float, default=None)
    p.add_argument("--vit-thresholds", type=float, nargs="+", default=[0.99, 0.95, 0.9, 0.8])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res: dict[str, Any] = {"env": {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine(),
                                   "tiny": args.tiny, "args": vars(args)}}
    if args.what in ("llava", "both"):
        res["llava"] = bench_llava(args)
    if args.what in ("vit", "both"):
        res["vit"] = bench_vit(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(args.out + ".md", "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
