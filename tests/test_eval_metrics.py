"""Scoring rules on hand-computed cases (lmms-eval conventions)."""

from __future__ import annotations

import pytest

from evals import metrics as M


def test_vqa_soft_accuracy_leave_one_out():
    answers = ["red"] * 3 + ["blue"] * 7
    # leave-one-out: dropping a "red" leaves 2 matches (2/3), dropping a "blue" leaves 3 (1.0)
    assert M.vqa_accuracy("red", answers) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert M.vqa_accuracy("Blue.", answers) == 1.0
    assert M.vqa_accuracy("green", answers) == 0.0
    assert M.vqa_accuracy("red", ["red"] * 2 + ["x"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    dicts = [{"answer": "two"}] * 10
    assert M.vqa_accuracy("2", dicts) == 1.0  # number words -> digits
    assert M.vqa_accuracy("a dog", ["dog"] * 10) == 1.0  # articles dropped


def test_evalai_normalisation():
    assert M.evalai_normalize("Dont pet a Dog!") == "don't pet dog"  # contraction restored, article + ! dropped
    assert M.evalai_normalize("1,000") == "1000"
    assert M.process_punctuation("yes.") == "yes"
    assert M.process_punctuation("3.5") == "3.5"
    assert M.vqa_accuracy("Dont", ["don't"] * 10, style="textvqa") == 1.0


def test_exact_match_gqa():
    assert M.exact_match("Left.", "left") == 1.0
    assert M.exact_match(" yes ", "Yes") == 1.0
    assert M.exact_match("the cat", "cat") == 0.0
    assert M.exact_match("Left", "left", ignore_case=False) == 0.0


def test_pope_metrics():
    preds = ["yes", "yes", "no", "no", "Yes ", "maybe"]
    gts = ["yes", "no", "yes", "no", "yes", "no"]
    m = M.pope_metrics(preds, gts)
    # tp=2 (0, 4), fp=1 (1), fn=1 (2), correct: 0, 3, 4 -> 3/6
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(0.5)
    assert M.pope_metrics(["no"], ["yes"])["f1"] == 0.0


def test_box_parsing_and_iou():
    assert M.parse_box("It is at [0.1, 0.2, 0.5, 0.6].") == [0.1, 0.2, 0.5, 0.6]
    assert M.parse_box("no box here") == [0.0, 0.0, 0.0, 0.0]
    assert M.parse_box("[1,2,3]") == [0.0, 0.0, 0.0, 0.0]
    assert M.box_iou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert M.box_iou([0, 0, 0.5, 1], [0.5, 0, 1, 1]) == 0.0
    assert M.box_iou([0, 0, 1, 1], [0, 0, 0.5, 1]) == pytest.approx(0.5)
    assert M.box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_rec_metrics():
    gt = [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0.5, 0.5]]
    pred = [[0, 0, 1, 1], [0, 0, 0.5, 1], [0.6, 0.6, 1, 1]]
    m = M.rec_metrics(pred, gt)
    assert m["ACC@0.5"] == pytest.approx(2 / 3)  # IoUs 1.0, 0.5, 0.0
    assert m["ACC@0.7"] == pytest.approx(1 / 3)
    assert m["IoU"] == pytest.approx(0.5)
    assert m["Center_ACC"] == pytest.approx(2 / 3)


def test_padded_square_to_original():
    # 200 x 100 image padded to 200 x 200: the image occupies y in [0.25, 0.75] of the square
    assert M.padded_to_original([0.0, 0.25, 1.0, 0.75], 200, 100) == pytest.approx([0, 0, 1, 1])
    assert M.padded_to_original([0.5, 0.5, 1.0, 0.75], 200, 100) == pytest.approx([0.5, 0.5, 1, 1])


def test_shapes_task_scoring_uses_fixture_rules():
    from evals.tasks import get_task

    task = get_task("shapes")
    docs = task.docs(5, 0)
    assert [d["kind"] for d in docs] == ["attribute", "counting", "existence", "localization", "box"]
    recs = [task.score(d, d["answer"]) for d in docs]
    assert all(r["score"] == 1.0 for r in recs)
    agg = task.aggregate(recs)
    assert agg["accuracy"] == 1.0 and agg["rec"]["ACC@0.5"] == 1.0 and agg["pope"]["accuracy"] == 1.0
    assert task.score(docs[4], "[0.0, 0.0, 0.01, 0.01]")["score"] == 0.0
