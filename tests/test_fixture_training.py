"""The fixture training's auxiliary attention targets (evals/fixtures/common.py): the attention they train
is the attention the model computes, and the QA encoding marks the right tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parents[1] / "evals" / "fixtures"))
import common as C  # noqa: E402

from tokenprune.demo import build as B  # noqa: E402
from tokenprune.demo import generator as S  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return B.build_tokenizer()


def _scene_batch(tok, n_img: int = 12):
    objs, qas = None, []
    for i in range(50):  # a scene with a counting question among its turns
        _, objs, rng = S.make_scene("val", 3, i)
        qas = C.sample_qas(objs, rng, 8, {"counting": 1.0, "localization": 1.0})
        if any(q["kind"] == "counting" for q in qas) and any("target" in q for q in qas):
            break
    return objs, qas, C.collate([C.encode_turns(tok, qas, n_img, objs)], tok.pad_token_id)


def test_encode_turns_marks_naming_word_and_counted_objects(tok):
    objs, qas, t = _scene_batch(tok)
    ids = t["input_ids"][0]
    assistant = tok.convert_tokens_to_ids("assistant:")
    marked = (t["cnt"][0] >= 0).nonzero().flatten().tolist()
    counting = [q for q in qas if q["kind"] == "counting"]
    assert len(marked) == len(counting)
    for pos, qa in zip(marked, counting, strict=True):
        assert ids[pos] == assistant and t["labels"][0, pos + 1] != -100  # last prompt token of its turn
        mask = int(t["cnt"][0, pos])
        assert bin(mask).count("1") == int(qa["answer"])
        word = qa["question"].split()[2][:-1]
        assert all(word == "shape" or objs[i]["shape"] == word for i in range(len(objs)) if mask >> i & 1)
    for pos in (t["ptr"][0] >= 0).nonzero().flatten().tolist():
        assert int(ids[pos]) in C.naming_ids(tok)


def test_attention_target_logits_equal_eager_attention(tok):
    torch.manual_seed(0)
    cfg = B.text_config(tok, layers=3, hidden=64)
    cfg._attn_implementation = "eager"
    lm = LlamaForCausalLM(cfg).eval()
    aux = C.AttentionTargets(lm.model, (0, 1), [0, 1], count=(2, [3]))
    ids = torch.randint(5, len(tok), (2, 30))
    with torch.no_grad():
        out = lm(input_ids=ids, output_attentions=True)
    b_idx, q_idx = torch.tensor([0, 1, 1]), torch.tensor([29, 7, 18])
    for layer, heads in ((0, [0, 1]), (1, [0]), (2, [3])):
        lg = aux.logits(layer, heads, b_idx, q_idx)
        causal = torch.arange(30)[None, None] <= q_idx[:, None, None]
        got = torch.softmax(lg.masked_fill(~causal, -1e9), -1)
        want = out.attentions[layer][b_idx, :, q_idx][:, heads]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_count_target_is_zero_only_for_even_attention_on_sink_and_counted_centres():
    allowed = torch.ones(1, 6, dtype=torch.bool)
    hit = torch.tensor([[True, False, True, False, True, False]])
    even = torch.where(hit, 0.0, -30.0)[:, None]  # (n, H=1, L)
    assert float(C._target_kl(even, allowed, hit)) == pytest.approx(0.0, abs=1e-6)
    skewed = torch.tensor([[[2.0, -30.0, 0.0, -30.0, 0.0, -30.0]]])
    assert float(C._target_kl(skewed, allowed, hit)) > 0.1
    np.testing.assert_array_equal(C.counted_mask({"question": "How many shapes are there?", "answer": "2"},
                                                 [{"shape": "circle"}, {"shape": "square"}]), 3)


def test_losses_reach_the_target_heads_only_when_asked(tok):
    torch.manual_seed(0)
    cfg = B.text_config(tok, layers=3, hidden=64)
    lm = LlamaForCausalLM(cfg)
    objs, _, t = _scene_batch(tok)
    img_id = tok.convert_tokens_to_ids("<image>")
    who = torch.full((1, 12), -1)
    who[0, : len(objs)] = torch.arange(len(objs))  # one image token per object, used as its centre as well
    t["who"] = t["ctr"] = C.who_per_position(t["input_ids"], img_id, who)
    for count in ((2, [1]), None):
        aux = C.AttentionTargets(lm.model, (0, 1), [0], count=count)
        lm.zero_grad()
        lm(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        ptr, copy, cnt = aux.losses(t)
        assert ptr.item() > 0 and copy.item() > 0
        (ptr + copy + cnt).backward()
        grad = lm.model.layers[2].self_attn.q_proj.weight.grad
        if count is None:
            assert cnt.item() == 0 and grad is None
        else:
            assert cnt.item() > 0 and grad is not None and float(grad.abs().sum()) > 0
        for layer in lm.model.layers:
            layer.self_attn._forward_pre_hooks.clear()


def test_patch_info_on_a_non_square_token_grid():
    """A 288 x 192 image on Qwen's 10 x 15 token grid: each object's centre token and its box (normalised by
    width and height), foreground only where the object is."""
    _, objs, _ = S.make_scene("val", 3, 1, size=(288, 192))
    info = C.patch_info(objs, (10, 15), (288, 192))
    assert info["who"].shape == (150,)
    for k, o in enumerate(objs):
        x0, y0, x1, y1 = o["bbox"]
        (c,) = (info["center_who"] == k).nonzero()[0]
        assert divmod(int(c), 15) == (int((y0 + y1) / 2) * 10 // 192, int((x0 + x1) / 2) * 15 // 288)
        np.testing.assert_allclose(info["box"][c], [x0 / 288, y0 / 192, x1 / 288, y1 / 192], rtol=1e-6)
        for t in (info["who"] == k).nonzero()[0]:
            r, col = divmod(int(t), 15)
            assert x0 - 19.2 < (col + 0.5) * 19.2 < x1 + 19.2 and y0 - 19.2 < (r + 0.5) * 19.2 < y1 + 19.2


def test_relative_symbolic_tokens_move_with_the_scene(tok):
    """``Symbolic(relative=True)`` carries no absolute position: shifting every object by one token shifts the
    tokens by one position and changes nothing else (the absolute variant changes)."""
    _, objs, _ = S.make_scene("val", 3, 4, max_n=2)
    objs = [{**o, "bbox": (o["bbox"][0] % 48 + 16, o["bbox"][1], o["bbox"][0] % 48 + 16 + o["bbox"][2] - o["bbox"][0],
                           o["bbox"][3]), "cell": o["cell"] - o["cell"] % 3} for o in objs]
    moved = [{**o, "bbox": (o["bbox"][0] + 16, o["bbox"][1], o["bbox"][2] + 16, o["bbox"][3])} for o in objs]
    torch.manual_seed(0)
    for relative in (True, False):
        sym = C.Symbolic(tok, 32, grid=14, own_table=True, relative=relative)
        a, b = (sym(None, C.stack_info([C.patch_info(o)]))[0].view(14, 14, -1) for o in (objs, moved))
        assert torch.allclose(a[:, :-1], b[:, 1:], atol=1e-6) == relative


def test_coordinate_targets_reward_near_misses(tok):
    """Soft box-coordinate targets: the loss of a coordinate token falls with the distance of the model's guess
    from the true value; other tokens keep the plain cross-entropy, and a vanishing width is one-hot."""
    coords = C.CoordinateTargets(tok, 0.015)
    vocab = len(tok)
    true = int(coords.ids[40])  # "0.40"
    word = tok.convert_tokens_to_ids("circle")
    losses = []
    for guess in (40, 41, 43, 60):  # logits peaked on 0.40, 0.41, 0.43, 0.60
        lg = torch.zeros(2, vocab)
        lg[0, coords.ids[guess]] = 8.0
        lg[1, word] = 8.0
        got = coords.loss(lg, torch.tensor([true, word]))
        assert torch.allclose(got[1], torch.nn.functional.cross_entropy(lg[1:], torch.tensor([word])))
        losses.append(float(got[0]))
    assert losses == sorted(losses) and losses[0] < losses[-1]
    lg = torch.randn(3, vocab)
    tgt = torch.tensor([true, word, int(coords.ids[0])])
    one_hot = torch.nn.functional.cross_entropy(lg, tgt, reduction="none")
    assert torch.allclose(C.CoordinateTargets(tok, 1e-4).loss(lg, tgt), one_hot, atol=1e-5)
    assert torch.equal(C.CoordinateTargets(tok, 0.0).loss(lg, tgt), one_hot)
