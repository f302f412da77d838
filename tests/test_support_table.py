"""The README's supported-models x methods table says what ``patch(model, method, budget=0.5)`` does
(``early_exit``: ``threshold=0.9``, it takes no budget)."""

from pathlib import Path

import tiny

import tokenprune
from tokenprune.errors import TokenPruneError

FAMILIES = {
    "LLaVA-1.5": lambda: tiny.llava()[0],
    "LLaVA-NeXT": lambda: tiny.llava_next()[0],
    "LLaVA-OneVision": tiny.llava_onevision,
    "Qwen2-VL": tiny.qwen2_vl,
    "Qwen2.5-VL": tiny.qwen2_5_vl,
    "Qwen3-VL": tiny.qwen3_vl,
}


def _table() -> tuple[list[str], dict[str, list[str]]]:
    lines = (Path(__file__).parents[1] / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | LLaVA-1.5 |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")][1:]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return header, rows


ARGS = {"early_exit": {"threshold": 0.9}}  # reduces no tokens: takes no budget


def test_readme_support_table_matches_patch():
    header, rows = _table()
    assert header == list(FAMILIES)
    assert {"random", "uniform", "fastv", "pdrop", "feather", "hired", "visionzip", "tome"} <= set(rows)
    for family, build in FAMILIES.items():
        model = build()
        for method, cells in rows.items():
            cell = cells[header.index(family)]
            try:
                tokenprune.patch(model, method, **ARGS.get(method, {"budget": 0.5})).remove()
                ok = True
            except TokenPruneError:
                ok = False
            assert cell.startswith("✓") == ok, (family, method, cell)
