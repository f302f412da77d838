"""vLLM plugin vs Hugging Face hooks on the bundled LLaVA fixture (issue #20 acceptance).

For each method at ``--budget``: greedy answers of ``tokenprune.patch`` (transformers) and of vLLM with
``hf_overrides={"tokenprune": ...}`` on the first ``--n`` shapes test examples; the share of equal
answers, of equal kept sets (per image, compared as multisets since vLLM may encode images in any
order), and whether vLLM's prompt length is text + kept tokens. Also budget 1.0 against stock vLLM
(no ``tokenprune`` key). Writes ``OUT.json`` and ``OUT.md`` (``--update``: adds the methods run now to them).

Runs in the vLLM venv (``pip install tokenprune-vlm[vllm]``; see README "Serving at scale with vLLM"):
``python evals/vllm_agreement.py --out evals/results/vllm_agreement``. :func:`engine_args`, :func:`request`
and :func:`write` serve ``evals/bench_vllm.py`` too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import tokenprune  # noqa: E402
from tokenprune.demo import checkpoint_path, load, prompt, shapes  # noqa: E402
from tokenprune.errors import SiteError  # noqa: E402

METHODS = ("random", "uniform", "visionzip", "hired", "divprune", "vispruner", "pool")
KINDS = ("llava", "llava_next", "qwen2_5_vl")
MAX_NEW_TOKENS = 12
IMAGE_TOKEN = 4  # the LLaVA fixtures' <image> id


def examples_of(kind: str, n: int) -> list[dict]:
    """The first ``n`` shapes test examples in the image sizes fixture ``kind`` was trained on."""
    return shapes("test", n, aspect="mixed" if kind == "qwen2_5_vl" else "square")


def request(example: dict, kind: str) -> dict[str, Any]:
    """One vLLM request: the fixture's training prompt and the example's image."""
    return {"prompt": prompt(example["question"], kind), "multi_modal_data": {"image": example["image"]}}


def engine_args(method: str | None, budget: float, kind: str = "llava", **kwargs) -> dict[str, Any]:
    """Arguments of a vLLM engine (``LLM`` or ``AsyncEngineArgs``) on fixture ``kind`` (or ``model=``): with
    tokenprune's plugin at ``method``/``budget``, or without the ``tokenprune`` key (``method=None``)."""
    over = {"tokenprune": {"method": method, "budget": budget}} if method else {}
    limit = {"image": 1, "video": 0} if kind == "qwen2_5_vl" else {"image": 1}  # Qwen: no videos while pruning
    args = dict(model=str(checkpoint_path(kind)), max_model_len=2048, enforce_eager=True, dtype="float32", seed=0,
                limit_mm_per_prompt=limit, hf_overrides=over)
    return {**args, **kwargs}


def hf_answers(
    method: str | None, budget: float, examples: list[dict], batch: int = 10, kind: str = "llava"
) -> dict[str, Any]:
    """Greedy answers of fixture ``kind`` under ``tokenprune.patch`` (``method=None``: unpatched), kept
    original indices per example and prompt lengths (text + kept tokens)."""
    model, proc = load(kind)
    image_token = model.config.image_token_id
    handle = tokenprune.patch(model, method, budget) if method else None
    answers, kept, lengths = [], [], []
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        inp = proc(images=[e["image"] for e in chunk], text=[prompt(e["question"], kind) for e in chunk],
                   return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inp, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answers += proc.tokenizer.batch_decode(out[:, inp["input_ids"].shape[1] :], skip_special_tokens=True)
        n_text = ((inp["input_ids"] != image_token) & inp["attention_mask"].bool()).sum(-1)
        if handle is not None:
            rec = handle.trace.stages[-1].kept
            kept += [r[r >= 0].tolist() for r in rec]
            lengths += (n_text + (rec >= 0).sum(-1)).tolist()
        else:
            lengths += inp["attention_mask"].sum(-1).tolist()
    return {"answers": answers, "kept": kept, "lengths": lengths}


def vllm_engine(method: str | None, budget: float, kind: str = "llava", **kwargs) -> Any:
    """An in-process ``vllm.LLM`` with :func:`engine_args`."""
    from vllm import LLM

    return LLM(**engine_args(method, budget, kind, **kwargs))


def vllm_answers(llm: Any, examples: list[dict], kind: str = "llava") -> dict[str, Any]:
    """Greedy answers, prompt lengths and kept sets (in encoding order; in-process engines only) of ``llm``
    on ``examples``."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0)
    outs = llm.generate([request(e, kind) for e in examples], sp, use_tqdm=False)
    in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"  # the model object is reachable
    traces = llm.apply_model(lambda m: list(getattr(m, "kept_trace", []))) if in_process else []
    return {
        "answers": [o.outputs[0].text for o in outs],
        "lengths": [len(o.prompt_token_ids) for o in outs],
        "kept": traces[0] if traces else [],
    }


def vllm_run(method: str | None, budget: float, examples: list[dict], kind: str = "llava", **kwargs) -> dict[str, Any]:
    """:func:`vllm_answers` of a fresh engine, shut down before returning (vLLM's in-process engines
    share process-wide state: an old engine must be gone before the next one starts)."""
    llm = vllm_engine(method, budget, kind, **kwargs)
    try:
        return vllm_answers(llm, examples, kind)
    finally:
        del llm
        gc.collect()


def compare(hf: dict, vl: dict) -> dict[str, Any]:
    """Agreement of two runs over the same examples."""
    n = len(hf["answers"])
    same = [a.strip() == b.strip() for a, b in zip(hf["answers"], vl["answers"])]
    out = {
        "n": n,
        "answers_equal": sum(same),
        "answers_equal_share": sum(same) / n,
        "lengths_equal": sum(a == b for a, b in zip(hf["lengths"], vl["lengths"])),
        "differing": [i for i, s in enumerate(same) if not s],
    }
    if hf.get("kept") and vl.get("kept"):
        a = Counter(tuple(k) for k in hf["kept"])
        b = Counter(tuple(k) for k in vl["kept"][-n:])
        out["kept_sets_equal"] = sum((a & b).values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--kind", default="llava", choices=KINDS, help="bundled fixture")
    ap.add_argument("--out", default=str(ROOT / "evals" / "results" / "vllm_agreement"))
    ap.add_argument("--update", action="store_true",
                    help="keep OUT.json's rows of methods not run now (same fixture, n and budget)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    examples = examples_of(args.kind, args.n)
    out = Path(args.out)
    command = "python evals/vllm_agreement.py " + " ".join(sys.argv[1:])
    result = {"model": f"bundled {args.kind} fixture", "n": args.n, "budget": args.budget, "methods": {},
              "seconds": 0.0, "commands": []}
    if args.update and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        if (old["model"], old["n"], old["budget"]) != (result["model"], args.n, args.budget):
            raise SystemExit(f"--update: {out}.json holds another fixture, n or budget")
        result.update(old)
        result["commands"] = old.get("commands") or [old["command"]]
    t0 = time.time()
    stock_run = vllm_run(None, 1.0, examples, args.kind)
    for method in args.methods:
        try:
            hf = hf_answers(method, args.budget, examples, kind=args.kind)
        except SiteError as err:  # refused on this architecture by tokenprune.patch (and so by the plugin)
            result["methods"][method] = {"refused": str(err)}
            continue
        vl = vllm_run(method, args.budget, examples, args.kind)
        vl_full = vllm_run(method, 1.0, examples, args.kind)
        result["methods"][method] = {
            "budget": args.budget,
            **compare(hf, vl),
            "budget_1_equals_stock": sum(a == b for a, b in zip(vl_full["answers"], stock_run["answers"])),
        }
        print(method, result["methods"][method], flush=True)
    result.pop("command", None)
    result.update(seconds=round(result["seconds"] + time.time() - t0, 1), versions=versions(),
                  commands=[*result["commands"], command])
    write(out, result, markdown(result))


def versions() -> dict[str, str]:
    """Versions of the packages a vLLM measurement depends on."""
    import transformers
    import vllm

    return {"vllm": vllm.__version__, "transformers": transformers.__version__, "torch": torch.__version__}


def write(out: Path, result: dict, md: str) -> None:
    """``OUT.json`` and ``OUT.md``; the markdown is printed too."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)


def markdown(result: dict) -> str:
    n = result["n"]
    lines = [
        f"# vLLM plugin vs Hugging Face hooks ({result['model']}, {n} shapes test examples)",
        "",
        f"Greedy answers ({MAX_NEW_TOKENS} new tokens) at budget {result['budget']}; "
        f"{'; '.join(f'`{c}`' for c in result['commands'])}; {result['versions']}; {result['seconds']} s in all.",
        "",
        "| method | answers equal to HF | kept sets equal | prompt length = text + kept "
        "| budget 1.0 = no `tokenprune` key |",
        "|---|---|---|---|---|",
    ]
    for m, r in result["methods"].items():
        if "refused" in r:
            lines.append(f"| {m} | refused (as by `tokenprune.patch`): {r['refused'].split(';')[0]} | | | |")
            continue
        lines.append(
            f"| {m} | {r['answers_equal']}/{n} ({100 * r['answers_equal_share']:.0f} %) | "
            f"{r.get('kept_sets_equal', '-')}/{n} | {r['lengths_equal']}/{n} | {r['budget_1_equals_stock']}/{n} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
