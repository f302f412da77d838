"""Invariant 4: generation with a KV cache after pruning equals cache-free references."""

import pytest
import tiny
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tokenprune


def test_pre_llm_decode_equals_explicitly_pruned_sequence():
    model, proc = tiny.llava()
    inputs = tiny.single(proc, 0)
    with tokenprune.patch(model, "random", budget=0.4, seed=3) as handle:
        tokens, _ = tiny.generate_logits(model, inputs, 4)
    kept = handle.trace.stage("random").kept[0]
    # reference: the unpatched model on the explicitly pruned prompt, original positions, no cache
    ids = inputs["input_ids"][0]
    is_img = ids == model.config.image_token_id
    img_cols = is_img.nonzero().flatten()
    keep_cols = torch.cat([(~is_img).nonzero().flatten(), img_cols[kept]]).sort().values
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output[0]
    seq, pos = ids[keep_cols][None], keep_cols[None]
    ref = []
    for _ in range(4):
        with torch.no_grad():
            logits = model(
                input_ids=seq,
                position_ids=pos,
                use_cache=False,
                mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[feats[kept]])},
            ).logits
        nxt = logits[:, -1].argmax(-1)
        ref.append(int(nxt))
        seq, pos = torch.cat([seq, nxt[None]], 1), torch.cat([pos, pos[:, -1:] + 1], 1)
    assert tokens[0].tolist() == ref


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("positions", ["keep", "renumber"])
def test_llm_site_decode_logits_equal_cache_free_recomputation(positions, attn):
    model, proc = tiny.llava()
    model.set_attn_implementation(attn)
    inputs = tiny.batch(proc)  # left padding, and rows keep different counts -> filler columns
    kept = ((0, 2, 3, 7, 8, 15), (1, 4, 5, 9))
    n = 4
    with tokenprune.patch(model, tiny.Fixed(kept=kept, positions=positions)) as handle:
        tokens, step_logits = tiny.generate_logits(model, inputs, n)
        assert [r[r >= 0].tolist() for r in handle.trace.stage("fixed").kept] == [list(k) for k in kept]
        for t in range(n):
            logits = tiny.cache_free_logits(model, inputs, tokens, t)
            assert torch.allclose(logits, step_logits[:, t], atol=1e-4), (positions, t)


def test_renumbered_positions_differ_from_kept_positions():
    model, proc = tiny.llava()
    inputs = tiny.single(proc, 0)
    out = {}
    for positions in ("keep", "renumber"):
        with tokenprune.patch(model, tiny.Fixed(kept=((0, 5, 10),), positions=positions)), torch.no_grad():
            out[positions] = model(**inputs).logits[:, -1]
    assert not torch.allclose(out["keep"], out["renumber"])


def test_llava_next_decode_with_pruning_matches_cache_free():
    model, proc = tiny.llava_next()
    inputs = tiny.batch(proc, sizes=((40, 70), (64, 32)))
    with tokenprune.patch(model, "uniform", budget=0.5, site="llm", layer=2):
        tokens, step_logits = tiny.generate_logits(model, inputs, 3)
        for t in range(3):
            assert torch.allclose(tiny.cache_free_logits(model, inputs, tokens, t), step_logits[:, t], atol=1e-4)
