"""The harness end to end on tiny checkpoints: cells, resume, reports, local benchmarks, CLIs."""

from __future__ import annotations

import json

import eval_helpers
import pytest

from evals import harness, runner
from evals.cli import main as eval_main
from evals.data import DatasetMissingError
from evals.harness import EvalConfig


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return eval_helpers.save_tiny(tmp_path_factory.mktemp("tiny") / "llava")


@pytest.fixture(scope="module")
def shapes_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    argv = ["--model", str(tiny_dir), "--task", "shapes", "--methods", "random,fastv,nosuchmethod",
            "--budgets", "0.5", "--limit", "5", "--out", str(out), "--latency-samples", "1", "--repeats", "1",
            "--warmup", "0", "--batch-size", "2", "--overlays", "2", "--no-progress"]
    assert eval_main(argv) == 0
    return out, argv


def test_run_writes_json_markdown_plots(shapes_run):
    out, _ = shapes_run
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "tokenprune.evals/1"
    assert "nosuchmethod" in res["skipped_methods"]
    cells = {(c["method"], c["budget"]): c for c in res["cells"]}
    assert set(cells) == {("none", None), ("random", 0.5), ("fastv", 0.5)}
    base, rnd = cells[("none", None)], cells[("random", 0.5)]
    assert base["status"] == "ok" and base["metrics"]["n"] == 5
    assert set(base["metrics"]["by_kind"]) == {"attribute", "counting", "existence", "localization", "box"}
    assert base["relative"]["flops_ratio"] == pytest.approx(1.0)
    assert rnd["realized_budget"] == pytest.approx(0.5, abs=0.05)
    assert rnd["relative"]["flops_ratio"] < 1.0
    assert rnd["relative"]["ideal_speedup"] == pytest.approx(1 / rnd["relative"]["flops_ratio"])
    assert rnd["flops_macs"]["llm_prefill"] < base["flops_macs"]["llm_prefill"]
    lat = rnd["latency"]
    assert lat["prefill_s"] > 0 and lat["e2e_s"] >= lat["prefill_s"] and lat["vision_s"] > 0
    assert 0 < lat["kv_cache_bytes"] < base["latency"]["kv_cache_bytes"]  # pruned prompt, smaller cache
    assert rnd["relative"]["speedup_prefill"] == pytest.approx(base["latency"]["prefill_s"] / lat["prefill_s"])
    md = (out / "results.md").read_text()
    assert "| random | 0.5 |" in md and "FLOPs ratio" in md
    for name in ("shapes_acc_vs_flops.png", "shapes_acc_vs_speedup.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    assert (out / "overlays" / "shapes_overlays.png").stat().st_size > 1000
    cell = json.loads((out / "cells" / "shapes" / "random@0.5.json").read_text())
    assert len(cell["records"]) == 5 and cell["records"][0]["overlay"]["kept"]
    assert len(cell["records"][0]["overlay"]["kept"]) < len(cell["records"][0]["overlay"]["y"])


def test_finished_cells_are_not_recomputed(shapes_run, monkeypatch):
    out, argv = shapes_run
    calls = []
    real = runner.run_docs
    monkeypatch.setattr(harness, "run_docs", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    (out / "cells" / "shapes" / "fastv@0.5.json").unlink()  # one unfinished cell
    assert eval_main(argv) == 0
    assert calls == ["fastv"]
    res = json.loads((out / "results.json").read_text())
    assert len(res["cells"]) == 3


def test_local_benchmarks_end_to_end(tiny_dir, tmp_path):
    pytest.importorskip("datasets")
    paths = eval_helpers.write_benchmarks(tmp_path / "data")
    cfg = EvalConfig(model=str(tiny_dir), tasks=list(paths), methods=["none", "random"], budgets=[0.5],
                     out=tmp_path / "out", limit=3, latency_samples=0, overlays=0, progress=False, report=False,
                     data={k: str(v) for k, v in paths.items()}, max_new_tokens=3)
    res = harness.run(cfg)
    ok = {(c["task"], c["method"]): c for c in res["cells"] if c["status"] == "ok"}
    assert len(ok) == 2 * len(paths)
    assert ok[("vqav2", "none")]["metrics"]["n"] == 3
    assert ok[("refcoco", "none")]["metrics"]["n"] == 3  # exploded: 2 + 1 expressions
    assert "rec" in ok[("refcoco", "none")]["metrics"]
    assert set(ok[("pope", "none")]["metrics"]["pope_by_category"]) == {"adversarial", "random"}


def test_local_task_docs_follow_lmms_eval_schema(tmp_path):
    pytest.importorskip("datasets")
    from evals.tasks import get_task

    paths = eval_helpers.write_benchmarks(tmp_path)
    vqa = get_task("vqav2").docs(None, 0, str(paths["vqav2"]))
    assert vqa[0]["text"].endswith("Answer the question using a single word or phrase.")
    assert get_task("vqav2").score(vqa[1], "2")["score"] == 1.0  # "two" == "2"
    gqa = get_task("gqa").docs(None, 0, str(paths["gqa"]))
    assert len(gqa) == 3 and gqa[0]["image"].size == gqa[2]["image"].size
    tv = get_task("textvqa").docs(None, 0, str(paths["textvqa"]))
    assert tv[0]["text"].startswith("What does it say?")
    ref = get_task("refcoco").docs(None, 0, str(paths["refcoco"]))
    w, h = ref[0]["size"]
    assert ref[0]["box"] == pytest.approx([0, 0, 24 / w, 20 / h])
    assert ref[0]["text"].endswith("describes: the left one")


def test_missing_dataset_says_where_to_put_it(tmp_path, monkeypatch):
    from evals.tasks import get_task

    monkeypatch.setenv("TOKENPRUNE_DATA", str(tmp_path))
    with pytest.raises(DatasetMissingError, match=r"vqav2: no local data at .*vqav2.*--data vqav2=PATH"):
        get_task("vqav2").docs(2, 0)


def test_tokenprune_cli_has_demo_subcommand(capsys):
    from tokenprune.cli import main, parser

    args = parser().parse_args(["demo", "--n", "10", "--out", "x"])
    assert args.command == "demo" and args.n == 10 and args.budget == 0.2
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_model_specs_are_checked_before_anything_loads(tmp_path, capsys):
    """Only the bundled vision-language fixtures and checkpoint folders of supported families can be evaluated;
    anything else is a typed error naming --model and what is allowed (ViT is an image classifier: nothing to
    prompt), in the harness, its CLI (usage error, exit 2, nothing written) and the demo."""
    import json

    from evals.cli import main as eval_main
    from evals.models import check_model, load_model
    from tokenprune.cli import main

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert check_model("bundled:qwen2_5_vl") == "qwen2_5_vl"
    for spec, error, match in (("bundled:vit", ValueError, "allowed: bundled:llava, bundled:llava_next, bundled:qwen"),
                               ("bundled:llava15", ValueError, "allowed: bundled:llava"),
                               (str(tmp_path / "bert"), ValueError, "model_type 'bert' is not supported"),
                               (str(tmp_path / "none"), FileNotFoundError, "nor a checkpoint folder")):
        with pytest.raises(error, match=match):
            load_model(spec)
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exit_:
            eval_main(["--model", spec, "--task", "shapes", "--out", str(out)])
        assert exit_.value.code == 2 and "error: --model: " in capsys.readouterr().err and not out.exists()
        with pytest.raises(SystemExit, match="tokenprune demo: --model"):
            main(["demo", "--model", spec, "--n", "2"])
