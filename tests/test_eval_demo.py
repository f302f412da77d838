"""``tokenprune demo`` on the bundled fixture: it writes every file it says it wrote (table, plots, overlays),
shows accuracy in %, and reports a budget a method cannot reach on the 8-layer LLM as n/a, not as a failure."""

from __future__ import annotations

import json
import logging

from tokenprune.cli import main


def test_demo_writes_what_it_prints(tmp_path, capsys, caplog):
    out = tmp_path / "demo"
    argv = ["demo", "--n", "10", "--methods", "random,fastv", "--budget", "0.1", "--latency-samples", "1",
            "--out", str(out), "--no-progress"]
    with caplog.at_level(logging.INFO, logger="tokenprune.evals"):
        assert main(argv) == 0
    text = capsys.readouterr().out
    written = [line.strip() for line in text.split("wrote:")[1].splitlines()[1:] if line.startswith("  ")]
    names = {p.split(str(out) + "/")[1] for p in written}
    assert {"results.json", "results.md", "plots/shapes_acc_vs_flops.png", "plots/shapes_acc_vs_speedup.png",
            "overlays/shapes_overlays.png"} <= names
    for p in written:
        assert (out / p.split(str(out) + "/")[1]).stat().st_size > 100, p

    cells = {c["method"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert cells["none"]["status"] == "ok" and cells["random"]["status"] == "ok"
    assert cells["fastv"]["status"] == "unreachable" and cells["fastv"]["min_budget"] == 0.125  # 1 of 8 layers
    assert ["fastv", "0.1", "n/a", "(min", "budget", ">", "0.125)"] in [line.split() for line in text.splitlines()]
    assert "n/a (min budget > 0.125)" in (out / "results.md").read_text()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "an unreachable budget is no failure"
    row = next(line.split() for line in text.splitlines() if line.startswith("none "))
    acc = 100 * cells["none"]["metrics"]["accuracy"]
    assert row[2] == f"{acc:.1f}"  # percent, as in the README
    assert "none: the unpruned model" in text and "FLOPs %:" in text and "ideal:" in text
    assert not (out / "overlays" / "images").exists() and (out / "inputs" / "shapes" / "0.png").is_file()
