"""Scores recomputed under sdpa agree with eager attention weights; FastV's kept set equals a naive
reference computed from eager attention weights."""

import pytest
import tiny
import torch

import tokenprune
from tokenprune.core.scoring import cls_attention, key_similarity, query_attention


def _capture_layer_inputs(model, layer_idx):
    """The kwargs of one LLM layer's self_attn call (plain hook, independent of the engine)."""
    seen = {}
    attn = model.model.language_model.layers[layer_idx].self_attn
    h = attn.register_forward_hook(lambda m, a, kw, out: seen.update(kw=kw, out=out), with_kwargs=True)
    return seen, h


@pytest.mark.parametrize("layer_idx", [0, 3])
def test_query_attention_matches_eager_weights(layer_idx):
    model, proc = tiny.llava()
    inputs = tiny.batch(proc)  # left padded batch of 2
    model.set_attn_implementation("eager")
    seen, h = _capture_layer_inputs(model, layer_idx)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    h.remove()
    eager = out.attentions[layer_idx]  # (B, H, L, L)
    kw = seen["kw"]
    attn = model.model.language_model.layers[layer_idx].self_attn
    b, n = inputs["input_ids"].shape
    cols = torch.tensor([[n - 1, n - 3]] * b)
    ours = query_attention(attn, kw["hidden_states"], cols, kw["position_embeddings"], kw["attention_mask"])
    ref = eager[:, :, [n - 1, n - 3]]
    valid = inputs["attention_mask"].bool()[:, None, None, :].expand_as(ref)
    assert torch.allclose(ours[valid], ref[valid].float(), atol=1e-5)
    # with the post-RoPE keys taken from the cache instead of recomputed
    cache_keys = seen["kw"]["past_key_values"].layers[layer_idx].keys
    ours_cached = query_attention(
        attn, kw["hidden_states"], cols, kw["position_embeddings"], kw["attention_mask"], cache_keys
    )
    assert torch.allclose(ours_cached[valid], ref[valid].float(), atol=1e-5)


def test_cls_attention_and_key_similarity_match_eager():
    model = tiny.clip_vision()
    model.set_attn_implementation("eager")
    layer = model.encoder.layers[2]
    seen = {}
    h = layer.self_attn.register_forward_hook(lambda m, a, kw, o: seen.update(kw=kw), with_kwargs=True)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=px, output_attentions=True)
    h.remove()
    hidden = seen["kw"]["hidden_states"]
    ours = cls_attention(layer.self_attn, hidden, num_heads=4, scale=layer.self_attn.scale)
    assert torch.allclose(ours, out.attentions[2][:, :, 0], atol=1e-5)
    k = layer.self_attn.k_proj(hidden).view(2, hidden.shape[1], 4, -1).mean(2)
    k = k / k.norm(dim=-1, keepdim=True)
    assert torch.allclose(key_similarity(layer.self_attn, hidden), k @ k.transpose(1, 2), atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_fastv_kept_set_equals_eager_reference(kind, attn):
    if kind == "llava":
        model, proc = tiny.llava()
        inputs = tiny.batch(proc)
    else:
        model, proc = tiny.llava_next()
        inputs = tiny.batch(proc, sizes=((40, 70), (64, 32)))
    k_layer, r = 2, 0.6
    # naive reference: eager weights of the unpatched model, last row, mean over heads, image columns
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[k_layer - 1]
    last = att[:, :, -1].mean(1)
    is_img = inputs["input_ids"] == model.config.image_token_id
    expected = []
    for b in range(is_img.shape[0]):
        s = last[b][is_img[b]]
        keep = max(1, round(s.numel() * (1 - r)))
        expected.append(sorted(s.topk(keep).indices.tolist()))
    model.set_attn_implementation(attn)
    with tokenprune.patch(model, "fastv", k=k_layer, r=r) as handle:
        tiny.greedy(model, inputs, 2)
        kept = handle.trace.stage("fastv").kept
    got = [row[row >= 0].tolist() for row in kept]
    assert got == expected
    assert handle.trace.stage("fastv").layer == k_layer


def test_fastv_scores_without_cache_match_with_cache():
    model, proc = tiny.llava()
    inputs = tiny.batch(proc)
    kept = []
    for use_cache in (True, False):
        with tokenprune.patch(model, "fastv", budget=0.4) as handle, torch.no_grad():
            model(**inputs, use_cache=use_cache)
            kept.append(handle.trace.stages[0].kept)
    assert torch.equal(kept[0], kept[1])
