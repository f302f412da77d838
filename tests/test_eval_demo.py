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


def test_demo_on_the_bundled_qwen_fixture(tmp_path, capsys):
    """``--model bundled:qwen2_5_vl``: the fixture's own prompt and its square, wide and tall test images, the
    M-RoPE default methods (PyramidDrop / FEATHER renumber positions and are refused there), overlays of
    non-square token grids."""
    from evals.demo import DEMO_METHODS_MROPE
    from evals.tasks import get_task
    from tokenprune.demo import fixture_shapes

    docs = get_task("shapes", fixture="qwen2_5_vl").docs(12, 0)
    assert {d["image"].size for d in docs} == {ex["image"].size for ex in fixture_shapes("qwen2_5_vl", "test", 12)}
    assert len({d["image"].size for d in docs}) == 3  # square, wide, tall
    assert "pdrop" not in DEMO_METHODS_MROPE and "feather" not in DEMO_METHODS_MROPE
    out = tmp_path / "demo"
    argv = ["demo", "--model", "bundled:qwen2_5_vl", "--n", "12", "--methods", "random", "--budget", "0.5",
            "--latency-samples", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    cells = {c["method"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert cells["none"]["status"] == "ok" and cells["random"]["status"] == "ok"
    assert cells["none"]["metrics"]["accuracy"] >= 0.5  # the trained fixture answers with its own prompt
    assert (out / "overlays" / "shapes_overlays.png").stat().st_size > 100
    assert "overlays/shapes_overlays.png" in text
