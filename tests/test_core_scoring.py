"""Scores recomputed under sdpa agree with eager attention weights; FastV's kept set equals a naive
reference computed from eager attention weights; scoring projects only the last token's query and
no key twice (issue #23)."""

import pytest
import tiny
import torch

import tokenprune
from tokenprune.core.scoring import cls_attention, key_similarity, query_attention
from tokenprune.core.state import cache_of


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
    cache_keys = cache_of(seen["kw"]).layers[layer_idx].keys
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


# ------------------------------------------------------------- issue #23: scoring that costs only what it must


def _random_attention_call(seed=0):
    """A GQA attention module (8 query heads, 2 key heads) and one left-padded batch of 3 rows."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, head_dim=16)
    attn = LlamaAttention(cfg, layer_idx=0).eval()
    lengths = torch.tensor([29, 20, 11])
    n = int(lengths.max())
    real = torch.arange(n)[None] >= n - lengths[:, None]  # left padding
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    hidden = torch.randn(3, n, 128) * 2.0
    pe = LlamaRotaryEmbedding(cfg)(hidden, positions)
    allowed = (torch.arange(n)[None, :] <= torch.arange(n)[:, None])[None, None] & real[:, None, None, :]
    return attn, hidden, pe, allowed


def _eager_rows(attn, hidden, pe, additive, cols):
    """Reference: transformers' own RoPE and key-head repetition, every query row, then the rows ``cols``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    b, n, _ = hidden.shape
    q = attn.q_proj(hidden).view(b, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(hidden).view(b, n, -1, attn.head_dim).transpose(1, 2)
    if pe is not None:
        q, k = apply_rotary_pos_emb(q, k, *pe)
    w = ((q @ repeat_kv(k, attn.num_key_value_groups).transpose(2, 3)) * attn.scaling + additive).softmax(-1)
    return torch.stack([w[i][:, cols[i]] for i in range(b)])


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_query_attention_with_given_keys_equals_the_full_formula(rope, mask_kind):
    """Keys projected here, handed over before RoPE (a captured k_proj output) or after it (the
    KV cache) give the attention rows of the full eager formula: GQA, left padding, both mask kinds."""
    from tokenprune.core.scoring import apply_rope, split_heads

    attn, hidden, pe, allowed = _random_attention_call()
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    mask = allowed if mask_kind == "bool" else additive
    n = hidden.shape[1]
    cols = torch.tensor([[n - 1, n - 4]] * 3)
    ref = _eager_rows(attn, hidden, pe if rope else None, additive, cols)
    pe_used = pe if rope else None
    with torch.no_grad():
        raw = split_heads(attn.k_proj(hidden), attn.head_dim)
        rotated = apply_rope(raw, *pe) if rope else raw
        got = {
            "projected here": query_attention(attn, hidden, cols, pe_used, mask),
            "before RoPE": query_attention(attn, hidden, cols, pe_used, mask, raw, rotated=False),
            "after RoPE": query_attention(attn, hidden, cols, pe_used, mask, rotated, rotated=True),
        }
    for name, ours in got.items():
        assert torch.allclose(ours, ref, atol=1e-6), name
        for b in range(3):  # the kept sets a top-k of the head mean gives are the reference's
            assert torch.equal(ours[b, :, 0].mean(0).topk(6).indices, ref[b, :, 0].mean(0).topk(6).indices), name


class _LinearRows(torch.overrides.TorchFunctionMode):
    """Rows multiplied by each watched weight, call by call."""

    def __init__(self, weights):
        super().__init__()
        self.names = {id(w): name for name, w in weights.items()}
        self.rows = {name: [] for name in weights}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear and id(args[1]) in self.names:
            self.rows[self.names[id(args[1])]].append(args[0].numel() // args[0].shape[-1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["pdrop", "feather", "fastv"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_scoring_projects_no_key_twice(method, use_cache):
    """Every decoder layer's k_proj multiplies each row of its input once: FastV and FEATHER score
    with layer K-1's own keys (cache or captured projection), PyramidDrop's layer K attends with
    the keys its scoring projected (its own k_proj then gets no rows). FastV and FEATHER also take
    the last token's query from layer K-1's own q_proj; PyramidDrop projects only that query."""

    model, proc = tiny.llava()
    inputs = tiny.batch(proc)  # left padded; the rows keep different counts
    b = inputs["input_ids"].shape[0]
    layers = model.model.language_model.layers
    watched = {(j, p): getattr(lay.self_attn, p).weight for j, lay in enumerate(layers) for p in ("q_proj", "k_proj")}
    params = {"pdrop": {"lam": 0.5, "layers": (2, 5)}, "feather": {"keep": 0.5, "layers": (2, 5)}, "fastv": {"r": 0.5}}
    with tokenprune.patch(model, method, **params[method]) as handle, torch.no_grad():
        with _LinearRows(watched) as count:
            logits = model(**inputs, use_cache=use_cache).logits
        plan = tuple((st.layer, tuple(tuple(r[r >= 0].tolist()) for r in st.kept)) for st in handle.trace.stages)
    stages = [layer for layer, _ in plan]
    source = {"pdrop": 0, "feather": -1, "fastv": -1}[method]  # stage K scores with layer K + source's keys
    own_q = []  # rows the layer's own q_proj call multiplies (what the layer sees)
    for j in range(len(layers)):
        q, k = count.rows[(j, "q_proj")], count.rows[(j, "k_proj")]
        if source == 0 and j in stages:  # scoring's last query first; the layer's k_proj gets no rows
            assert q[0] == b and k == [own_q[j - 1], 0] and own_q[j - 1] > q[1], (j, q, k)
        else:  # one call each on the same rows (FastV / FEATHER reuse layer K-1's query and keys)
            assert k == q, (j, q, k)
        own_q.append(q[1] if source == 0 and j in stages else q[0])
    # the reused keys are the ones the layer would have projected: same logits as dictating the kept sets
    with tokenprune.patch(model, tiny.Fixed(plan=plan, positions="renumber" if method == "pdrop" else "keep")):
        with torch.no_grad():
            assert torch.allclose(model(**inputs, use_cache=use_cache).logits, logits, atol=1e-5)
