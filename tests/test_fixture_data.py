"""Shapes benchmark generator, prompt and scoring (fast, no models)."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from tokenprune.demo import KINDS, iou, parse_box, prompt, score, shapes
from tokenprune.demo import generator as G


def _digest(img) -> str:
    return hashlib.sha1(np.asarray(img).tobytes()).hexdigest()


def test_shapes_keys_kinds_and_balance():
    data = shapes("test", n=100, seed=3)
    assert len(data) == 100
    assert Counter(d["kind"] for d in data) == {k: 20 for k in KINDS}
    for d in data:
        assert {"image", "question", "answer", "kind"} <= set(d)
        assert d["image"].size == (G.IMG, G.IMG) and d["image"].mode == "RGB"
        assert 1 <= len(d["objects"]) <= G.MAX_SHAPES
        if d["kind"] in ("box", "localization"):
            assert all(0.0 <= v <= 1.0 for v in d["box"])
    exist = Counter(d["answer"] for d in data if d["kind"] == "existence")
    assert exist == {"yes": 10, "no": 10}
    assert set(Counter(d["answer"] for d in data if d["kind"] == "localization")) <= set(G.CELL_NAMES)


def test_answers_match_scene():
    for d in shapes("val", n=200, seed=1):
        objs, q, a = d["objects"], d["question"], d["answer"]
        if d["kind"] == "counting":
            if "shapes" in q:
                assert int(a) == len(objs)
            else:
                s = q.split()[2][:-1]
                assert int(a) == sum(o["shape"] == s for o in objs)
        elif d["kind"] == "existence":
            c, s = q.rstrip("?").split()[-2:]
            assert (a == "yes") == any(o["color"] == c and o["shape"] == s for o in objs)
        elif d["kind"] == "box":
            assert parse_box(a) == d["box"]
            c, s = q.rstrip(".").split()[-2:]
            (o,) = [o for o in objs if o["color"] == c and o["shape"] == s]
            assert d["box"] == [round(v / G.IMG, 2) for v in o["bbox"]]
            assert score("box", a, d) == 1.0


def test_deterministic_and_prefix_stable():
    a = shapes("test", n=12, seed=5)
    b = shapes("test", n=20, seed=5)
    assert [_digest(x["image"]) for x in a] == [_digest(x["image"]) for x in b[:12]]
    assert [x["question"] for x in a] == [x["question"] for x in b[:12]]
    c = shapes("test", n=12, seed=6)
    assert len({_digest(x["image"]) for x in a} & {_digest(x["image"]) for x in c}) == 0


def test_objects_cover_top_rows_and_corners():
    cells = Counter(o["cell"] for d in shapes("test", n=300, seed=0) for o in d["objects"])
    assert all(cells[c] > 20 for c in range(9))  # every cell, corners and top row included


def test_test_split_never_in_training_streams():
    """The training scripts draw scenes with G.make_scene("train", stream, index); test images never match."""
    test = {_digest(d["image"]) for d in shapes("test", n=300, seed=0)}
    train = set()
    for stream in (0, 1, 2, 5, 7):  # stage seeds used by evals/fixtures/train_*.py with --seed 0
        for i in range(120):
            train.add(_digest(G.make_scene("train", stream, i)[0]))
    assert not test & train
    # the streams themselves are disjoint by construction (the split id is part of the seed entropy)
    a = G.example_rng("test", 0, 0).integers(1 << 62, size=4)
    b = G.example_rng("train", 0, 0).integers(1 << 62, size=4)
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="split"):
        shapes("dev", n=1)


def test_prompt_and_score():
    assert prompt("Is there a red circle?") == "USER: <image>\nIs there a red circle? ASSISTANT:"
    ex = {"answer": "red", "kind": "attribute"}
    assert score("attribute", " Red</s>", ex) == 1.0
    assert score("attribute", "blue", ex) == 0.0
    box_ex = {"answer": "[0.10, 0.10, 0.30, 0.30]", "box": [0.1, 0.1, 0.3, 0.3]}
    assert score("box", "[0.11, 0.10, 0.31, 0.30]", box_ex) == 1.0
    assert score("box", "[ 0.11, 0.1, 0.31, 0.3 ]", box_ex) == 1.0  # tokenizer-decoded spacing
    assert score("box", "[0.20, 0.20, 0.40, 0.40]", box_ex) == 0.0  # IoU 1/7
    assert score("box", "[0.30, 0.10, 0.10, 0.30]", box_ex) == 0.0  # x1 > x2: invalid
    assert score("box", "0.1 0.1 0.3 0.3", box_ex) == 0.0
    assert parse_box("[0.1, 0.2, 1.5, 0.3]") is None
    assert iou([0, 0, 1, 1], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert iou([0, 0, 0.5, 1], [0.5, 0, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="kind"):
        score("caption", "x", ex)


def test_tokenizer_keeps_object_names_whole_and_round_trips_answers():
    from tokenprune.demo import build

    tok = build.build_tokenizer()
    words = tok.convert_ids_to_tokens(tok("Where is the Red Circle?").input_ids)
    assert words == ["<s>", "where", "is", "the", "red_circle", "?"]
    assert "<unk>" not in tok.convert_ids_to_tokens(tok(prompt("How many circles are there?")).input_ids)
    for ex in shapes("test", n=25, seed=3):
        ids = tok(ex["question"] + " " + ex["answer"], add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids, ex["question"]
        answer_ids = tok(ex["answer"], add_special_tokens=False).input_ids
        assert score(ex["kind"], tok.decode(answer_ids), ex) == 1.0, ex["answer"]


def test_mixed_aspect_variant():
    """``aspect="mixed"`` cycles square / wide / tall images; its square examples are the square benchmark's,
    boxes are normalised by width and height, and every shape stays inside its grid cell."""
    square = shapes("test", n=30, seed=4)
    mixed = shapes("test", n=30, seed=4, aspect="mixed")
    assert [d["image"].size for d in mixed[:3]] == list(G.MIXED_SIZES)
    assert {(d["kind"], d["image"].size) for d in mixed} == {(k, s) for k in KINDS for s in G.MIXED_SIZES}
    for i, (a, b) in enumerate(zip(square, mixed, strict=True)):
        if i % 3 == 0:
            assert _digest(a["image"]) == _digest(b["image"]) and a["question"] == b["question"]
        w, h = b["image"].size
        for o in b["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            r, c = divmod(o["cell"], 3)
            assert c * w / 3 - 1 <= x0 < x1 <= (c + 1) * w / 3 + 1 and r * h / 3 - 1 <= y0 < y1 <= (r + 1) * h / 3 + 1
        if b["kind"] == "box":
            c_, s_ = b["question"].rstrip(".").split()[-2:]
            (o,) = [o for o in b["objects"] if o["color"] == c_ and o["shape"] == s_]
            assert b["box"] == [round(v / d, 2) for v, d in zip(o["bbox"], (w, h, w, h), strict=True)]
            assert score("box", b["answer"], b) == 1.0
    with pytest.raises(ValueError, match="aspect"):
        shapes("test", n=1, aspect="wide")


def test_qwen_prompt_and_tokenizer():
    from tokenprune.demo import build

    tok = build.build_tokenizer(qwen=True)
    base = build.build_tokenizer()
    assert {w: tok.convert_tokens_to_ids(w) for w in base.get_vocab()} == base.get_vocab()  # LLaVA ids unchanged
    text = prompt("Is there a red circle?", "qwen2_5_vl")
    assert text == "USER: <|vision_start|><|image_pad|><|vision_end|>\nIs there a red circle? ASSISTANT:"
    words = tok.convert_ids_to_tokens(tok(text).input_ids)
    assert words == ["<s>", "user:", *build.QWEN_SPECIALS, "is", "there", "a", "red_circle", "?", "assistant:"]
    with pytest.raises(ValueError, match="kind"):
        prompt("x", "vit")
