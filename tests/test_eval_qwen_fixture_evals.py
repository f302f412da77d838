"""The fixture evals on Qwen2.5-VL (issue #19): the position modes of eval_fixture's manual path, and
llm_methods / vision_methods running on the Qwen architecture (random weights: plumbing, not accuracy)."""

from __future__ import annotations

import os
import sys

import torch

from evals import llm_methods, methods_table, vision_methods
from tokenprune.demo import fixture_shapes, prompt
from tokenprune.demo.build import untrained

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "evals", "fixtures"))
import eval_fixture  # noqa: E402


def test_drop_keeps_original_3d_positions_or_renumbers_them_1d():
    ids = torch.tensor([[0, 1, 9, 9, 9, 9, 2], [5, 1, 9, 9, 9, 9, 2]])  # 9 = image token; row 0 left-padded
    am = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    x = torch.arange(14.0).view(2, 7, 1)
    pos = torch.stack([torch.arange(7).expand(2, 7), torch.arange(7).expand(2, 7) + 10, torch.arange(7).expand(2, 7)
                       + 20])  # (3, B, L): distinct rows, as M-RoPE's h / w rows are for an image
    kept = [torch.tensor([1, 3]), torch.tensor([0])]
    xs, am2, orig = eval_fixture.drop_image_tokens(ids, x, am, pos, 9, kept, "original")
    assert xs[0, :, 0].tolist() == [0, 1, 3, 5, 6] and xs[1, :, 0].tolist() == [7, 7, 8, 9, 13]  # one pad slot
    assert am2.tolist() == [[0, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert orig[:, 0].tolist() == [[0, 1, 3, 5, 6], [10, 11, 13, 15, 16], [20, 21, 23, 25, 26]]
    _, _, flat = eval_fixture.drop_image_tokens(ids, x, am, pos, 9, kept, "renumber_1d")
    assert flat[:, 0].tolist() == [[0, 0, 1, 2, 3]] * 3 and flat[:, 1].tolist() == [[0, 0, 1, 2, 3]] * 3


def test_random_and_method_kept_sets_have_the_requested_size():
    model, proc = untrained("qwen2_5_vl")
    examples = fixture_shapes("qwen2_5_vl", "test", 2)
    inp = proc(images=[ex["image"] for ex in examples], text=[prompt(ex["question"], "qwen2_5_vl") for ex in examples],
               return_tensors="pt", padding=True)
    n = (inp["input_ids"] == model.config.image_token_id).sum(1)
    assert sorted(n.tolist()) == [144, 150]  # square and non-square images
    rnd = eval_fixture.random_kept(inp["input_ids"], model.config.image_token_id, 0.2, torch.Generator())
    assert [len(k) for k in rnd] == [round(0.2 * int(v)) for v in n]
    div = eval_fixture.method_kept(model, dict(inp), "divprune", 0.2)
    assert [len(k) for k in div] == [round(0.2 * int(v)) for v in n]


def test_llm_methods_runs_and_reports_refusals_on_qwen():
    torch.manual_seed(0)
    model, proc = untrained("qwen2_5_vl")
    proc.tokenizer.padding_side = "left"
    examples = fixture_shapes("qwen2_5_vl", "test", 5)  # one question of each kind
    geo = llm_methods.Geometry(model)
    row = llm_methods.run(model, proc, examples, 5, "uniform", "uniform", {}, 0.5, geo, "qwen2_5_vl")
    assert abs(row["realized_budget"] - 0.5) < 0.01 and 0.0 <= row["top_half_last_stage"] <= 1.0
    refused = llm_methods.run(model, proc, examples, 5, "pdrop", "pdrop", {}, 0.5, geo, "qwen2_5_vl")
    assert "positions" in refused["refused"]  # renumbering has no meaning for 3-D M-RoPE positions
    assert "refused" in llm_methods.markdown({"kind": "qwen2_5_vl", "n": 2, "checkpoint": "-", "n_visual": 144,
                                              "llm_layers": 8}, [row, refused])
    base = llm_methods.run(model, proc, examples, 5, "unpruned", None, {}, None, geo, "qwen2_5_vl")
    data = {"meta": {"n": 2}, "rows": [base, row, refused]}
    rows, _ = methods_table.rows_from_llm(data)  # one table: refused configurations are named, not blank cells
    assert [r["label"] for r in rows] == ["unpruned", "uniform"]
    text = methods_table.markdown(rows, "2", [], "-", "qwen2_5_vl", methods_table.refusals(data))
    assert "Refused on this model" in text and "pdrop: positions" in text


def test_vision_methods_runs_hired_on_qwen():
    model, proc = vision_methods.fixture("qwen2_5_vl", untrained=True)
    row = vision_methods.eval_vlm(model, proc, fixture_shapes("qwen2_5_vl", "test", 2), "hired", 0.2, 2, "qwen2_5_vl")
    assert abs(row["realised"] - 0.2) < 0.01 and row["prefill_GMACs"] > 0


def test_object_tokens_follow_each_image_grid():
    """eval_fixture's "kept tokens on objects" mask: one flag per visual token over the model's token grid (Qwen:
    merged patches of square, wide and tall images; LLaVA: 14 x 14); each object's centre token is on it and the
    share of flagged tokens follows the objects' area. LLaVA-NeXT's tiled layout has no single grid: None."""
    for kind in ("qwen2_5_vl", "llava", "llava_next"):
        model, proc = untrained(kind)
        examples = fixture_shapes(kind, "test", 3)
        inp = proc(images=[ex["image"] for ex in examples], text=[prompt(ex["question"], kind) for ex in examples],
                   return_tensors="pt", padding=True)
        for b, ex in enumerate(examples):
            on = eval_fixture.object_tokens(model, dict(inp), ex, b)
            if kind == "llava_next":
                assert on is None
                continue
            n = int((inp["input_ids"][b] == model.config.image_token_id).sum())
            rows, cols = (int(inp["image_grid_thw"][b, 1]) // 2, int(inp["image_grid_thw"][b, 2]) // 2) \
                if kind == "qwen2_5_vl" else (14, 14)
            assert on.shape == (n,) and rows * cols == n
            w, h = ex["image"].size
            for o in ex["objects"]:
                x0, y0, x1, y1 = o["bbox"]
                assert on[int((y0 + y1) / 2 * rows / h) * cols + int((x0 + x1) / 2 * cols / w)]
            area = sum((o["bbox"][2] - o["bbox"][0]) * (o["bbox"][3] - o["bbox"][1]) for o in ex["objects"]) / (w * h)
            assert abs(on.mean() - area) < 0.1, (kind, on.mean(), area)
