"""One results table for every token method on a fixture: the LLM-stage rows of ``evals/llm_methods.py``
and the vision-stage rows of ``evals/vision_methods.py`` (issues #4 and #5), mean accuracy and
per-question-type accuracy at each budget, side by side.

Both scripts give ``budget`` the same meaning for a pre-LLM method (share of visual tokens reaching the
LLM), and ``llm_methods`` also uses it for LLM-stage methods (mean over decoder layers of the visual tokens
entering a layer), so a column compares methods at equal visual-token compute in the LLM.

``python evals/methods_table.py --llm evals/results/llm_methods_llava.json evals/results/llm_methods_llava_2025.json
--vision evals/results/vision_methods_llava.json --kind llava --out evals/results/methods_llava``
writes ``<out>.md`` (and prints it). Several ``--llm`` / ``--vision`` files are merged (the unpruned row
comes from the first ``--llm`` file); each file's ``n`` is listed. Rows that carry prefill MACs per
sample (``tokenprune.flops.estimate``) also fill a GMACs table.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

KINDS = ("attribute", "counting", "existence", "localization", "box")


def rows_from_llm(data: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """``(label, budget, accuracy)`` rows of an ``llm_methods`` result (paper-setting rows and configurations
    the library refuses on the model left out: see :func:`refusals`)."""
    rows, refused = [], refusals(data)
    for r in data["rows"]:
        if "paper" in r["label"] or r["label"] in refused:
            continue
        rows.append({"label": r["label"], "budget": r["budget"], "acc": r.get("accuracy") or None,
                     "gmacs": r.get("prefill_GMACs")})
    return rows, int(data["meta"]["n"])


def refusals(data: dict[str, Any]) -> dict[str, str]:
    """Row label -> the library's message, for the configurations refused on the model at ``patch()``."""
    return {r["label"]: r["refused"] for r in data["rows"] if "refused" in r and "paper" not in r["label"]}


def rows_from_vision(data: dict[str, Any], kind: str) -> tuple[list[dict[str, Any]], int]:
    """Rows of a ``vision_methods`` result for one fixture (``rounds`` > 1 is named in the label)."""
    rows = []
    for r in data["vlm"].get(kind, []):
        if r.get("method") in (None, "unpruned"):
            continue
        label = r["method"] + (" (tower)" if r["method"] == "tome" else "")
        acc = None if "error" in r else {k: r[k] for k in (*KINDS, "mean")}
        rows.append({"label": label, "budget": r["budget"], "acc": acc, "gmacs": r.get("prefill_GMACs"),
                     "note": f"rounds={r['rounds']}" if (r.get("rounds") or 1) > 1 else ""})
    return rows, int(data["n"])


def markdown(llm: list[dict[str, Any]], n_llm: str, vis: list[dict[str, Any]], n_vis: str, kind: str,
             refused: dict[str, str] | None = None) -> str:
    budgets = sorted({r["budget"] for r in llm + vis if r["budget"] is not None}, reverse=True)
    labels = list(dict.fromkeys(r["label"] for r in llm + vis if r["budget"] is not None))
    cell = {(r["label"], r["budget"]): r for r in llm + vis}
    base = next(r for r in llm if r["budget"] is None)
    unpruned = base["acc"]
    base_gmacs = next((r["gmacs"] for r in llm if r["budget"] is None and r.get("gmacs")), "?")
    lines = [f"# Token methods on the {kind} fixture: mean accuracy % by budget",
             "",
             f"Rows from `evals/llm_methods.py` (n = {n_llm}: random / uniform, the LLM-stage methods and the "
             f"issue-#21 methods) and `evals/vision_methods.py` (n = {n_vis}: hired, visionzip, tome in the "
             f"tower). Unpruned: {unpruned['mean']} (first llm_methods file). \"—\": budget unreachable for that "
             "method on this model "
             "(the library's typed error).",
             *[f"Refused on this model (typed error at `patch()`): {label}: {msg}"
               for label, msg in (refused or {}).items()],
             "",
             "| budget | " + " | ".join(labels) + " |",
             "|---|" + "---|" * len(labels)]
    for b in budgets:
        out = []
        for label in labels:
            r = cell.get((label, b))
            if r is None:
                out.append("")
            elif r["acc"] is None:
                out.append("—")
            else:
                out.append(f"{r['acc']['mean']}" + (f" ({r['note']})" if r.get("note") else ""))
        lines.append(f"| {b} | " + " | ".join(out) + " |")
    lines += ["", "Per question type (attribute / counting / existence / localization / box):", "",
              "| method | " + " | ".join(str(b) for b in budgets) + " |", "|---|" + "---|" * len(budgets),
              "| unpruned | " + " / ".join(str(unpruned[k]) for k in KINDS) + " (all budgets) |"
              + " |" * (len(budgets) - 1)]
    for label in labels:
        out = []
        for b in budgets:
            r = cell.get((label, b))
            out.append("—" if r is None or r["acc"] is None else " / ".join(str(r["acc"][k]) for k in KINDS))
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    gm = [label for label in labels if any(cell.get((label, b), {}).get("gmacs") for b in budgets)]
    if gm:
        lines += ["", "Prefill GMACs per sample (model compute with the kept tokens, `tokenprune.flops.estimate`; "
                  f"selection overhead not included; unpruned {base_gmacs}):", "",
                  "| budget | " + " | ".join(gm) + " |", "|---|" + "---|" * len(gm)]
        for b in budgets:
            lines.append(f"| {b} | " + " | ".join(str(cell.get((label, b), {}).get("gmacs") or "—") for label in gm)
                         + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llm", required=True, nargs="+", help="llm_methods JSON files (the first has the unpruned row)")
    ap.add_argument("--vision", required=True, nargs="+", help="vision_methods JSON files")
    ap.add_argument("--kind", default="llava", choices=["llava", "llava_next", "qwen2_5_vl"])
    ap.add_argument("--out", default="results/methods_llava")
    args = ap.parse_args()
    llm, vis, n_llm, n_vis, refused = [], [], [], [], {}
    for path in args.llm:
        with open(path) as f:
            data = json.load(f)
        rows, n = rows_from_llm(data)
        refused.update(refusals(data))
        llm += rows
        n_llm.append(str(n))
    for path in args.vision:
        with open(path) as f:
            rows, n = rows_from_vision(json.load(f), args.kind)
        vis += rows
        n_vis.append(str(n))
    text = markdown(llm, " / ".join(n_llm), vis, " / ".join(n_vis), args.kind, refused)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
