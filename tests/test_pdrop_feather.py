"""PyramidDrop and FEATHER (issue #4): kept sets equal plain-loop references built from eager
attention weights, budget 1.0 is exact, realised budgets, paper settings, KV-cache decoding under
both position conventions, the uniform-grid helper and error paths."""


import pytest
import tiny
import torch

import tokenprune
from tokenprune.adapters import anatomy_of
from tokenprune.core.select import stride_grid
from tokenprune.errors import BudgetError, MethodArgumentError
from tokenprune.methods.base import build
from tokenprune.methods.feather import Feather, grid_share
from tokenprune.methods.pyramiddrop import PyramidDrop

SHARP = 8.0
SIZES = {"llava": ((40, 48), (32, 32)), "llava_next": ((40, 70), (64, 32))}


def _build(kind, attn="sdpa", sharp=1.0, **kw):
    """A tiny model; ``sharp`` scales the LLM's query projections so attention rows are peaked
    and heads differ in how much mass they give the image (random tiny models attend almost
    uniformly, which would hide a wrong normalisation)."""
    model, proc = tiny.llava(**kw) if kind == "llava" else tiny.llava_next(**kw)
    model.set_attn_implementation(attn)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(sharp)
    return model, proc


# ---------------------------------------------------------------- naive reference (no engine code)


def _causal(n):
    m = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)
    return m[None, None]


def _geometry(model, inputs_i):
    """(tile, row, col, partition) of every visual token of one sample, from the adapter's layouts."""
    n = int((inputs_i["input_ids"] == model.config.image_token_id).sum())
    (lay,) = anatomy_of(model).layouts([n], {"image_sizes": inputs_i.get("image_sizes")})
    part = torch.full_like(lay.tile, -1)
    for p, idx in enumerate(lay.partitions.values()):
        part[idx] = p
    return lay.tile, lay.row, lay.col, part


def _grid(tile, row, col, part, stride=3):
    on = torch.zeros_like(tile, dtype=torch.bool)
    for p in part[tile >= 0].unique().tolist():
        m = (part == p) & (tile >= 0)
        on |= m & ((row - row[m].min()) % stride == 0) & ((col - col[m].min()) % stride == 0)
    return on


def reference_kept(model, inputs_i, plan, criterion, positions):
    """Run one unpadded sample through the decoder layer by layer (eager attention), dropping image
    tokens before the layers in ``plan`` ({layer: choose(scores, alive_visual_idx, stage) -> kept
    visual idx}). ``criterion`` "pdrop": eager weights of the layer about to run, last row, mean over
    heads, image columns; "feather": eager weights of the layer before, computed with the identity
    rotary embedding (no RoPE) and renormalised over the image columns. Returns kept idx per stage."""
    assert model.config.text_config._attn_implementation == "eager"
    lm = model.model.language_model
    with torch.no_grad():
        out = model(**inputs_i, output_hidden_states=True)
        h = out.hidden_states[0]
        vis = torch.where(inputs_i["input_ids"][0] == model.config.image_token_id, 0, -1)
        vis[vis == 0] = torch.arange(int((vis == 0).sum()))
        pos = torch.arange(h.shape[1])[None]
        kept, pending = [], None
        for j, layer in enumerate(lm.layers):
            if j in plan:
                if criterion == "pdrop":
                    _, w = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=_causal(h.shape[1]),
                                           position_embeddings=lm.rotary_emb(h, pos))
                    scores = w[0, :, -1][:, vis >= 0].mean(0)
                else:
                    scores = pending
                choice = plan[j](scores, vis[vis >= 0], len(kept))
                keep = (vis < 0) | torch.isin(vis, choice)
                h, vis = h[:, keep], vis[keep]
                pos = pos[:, keep] if positions == "keep" else torch.arange(h.shape[1])[None]
                kept.append(sorted(choice.tolist()))
            if criterion == "feather" and j + 1 in plan:
                cos, sin = lm.rotary_emb(h, pos)
                _, w = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=_causal(h.shape[1]),
                                       position_embeddings=(torch.ones_like(cos), torch.zeros_like(sin)))
                img = w[0, :, -1][:, vis >= 0]
                pending = (img / img.sum(-1, keepdim=True)).mean(0)
            h = layer(h, attention_mask=_causal(h.shape[1]), position_embeddings=lm.rotary_emb(h, pos))
        if not plan:  # the plain loop itself reproduces the model
            assert torch.allclose(lm.norm(h), out.hidden_states[-1], atol=1e-5)
    return kept


def _top(scores, idx, k):
    return idx[scores.topk(int(k)).indices] if k > 0 else idx[:0]


def pdrop_plan(layers, lam):
    return {k: (lambda s, idx, st: _top(s, idx, max(1, round(len(idx) * lam)))) for k in layers}


def feather_plan(layers, r, grid, paper, g=None):
    """Paper: top floor(r N) united with the grid, then top floor(r^2 M). Budget: the grid, then the
    best of the rest up to round((r + (1 - r) g) N); then top round(r^2 M)."""

    def first(s, idx, _):
        on = grid[idx]
        if paper:
            return torch.cat([_top(s, idx, int(len(idx) * r)), idx[on]]).unique()
        n1 = max(1, round(len(idx) * (r + (1 - r) * g)))
        return _top(s + 2.0 * on, idx, n1)

    def second(s, idx, _):
        return _top(s, idx, int(len(idx) * (r * r)) if paper else max(1, round(len(idx) * r * r)))

    return {layers[0]: first, layers[1]: second}


CASES = [
    ("pdrop", {"lam": 0.5}),
    ("pdrop", {"budget": 0.6, "positions": "keep"}),
    ("feather", {"keep": 0.3}),
    ("feather", {"budget": 0.6, "positions": "renumber"}),
]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llava", "llava_next"])
@pytest.mark.parametrize("method,params", CASES)
def test_kept_sets_equal_eager_reference(kind, attn, method, params):
    model, proc = _build(kind, attn, sharp=SHARP)
    inputs = tiny.batch(proc, SIZES[kind])
    assert inputs["attention_mask"][:, 0].min() == 0  # left padding
    budget = params.get("budget")
    m = build(method, **{k: v for k, v in params.items() if k != "budget"})
    with tokenprune.patch(model, m, budget=budget) as handle, torch.no_grad():
        model(**inputs)
        got = [[row[row >= 0].tolist() for row in st.kept] for st in handle.trace.stages]
    anatomy = anatomy_of(model)
    ref_model, _ = _build(kind, "eager", sharp=SHARP)
    for i in range(2):
        single = tiny.single(proc, i, SIZES[kind])
        if method == "pdrop":
            layers, lam = m.plan(anatomy, budget)
            plan = pdrop_plan(layers, lam)
        else:
            k1, k2, r = m.plan(anatomy, budget)
            plan = feather_plan((k1, k2), r, _grid(*_geometry(model, single)), m.keep is not None,
                                grid_share(anatomy, m.stride))
        expected = reference_kept(ref_model, single, plan, method, m.positions)
        assert [stage[i] for stage in got] == expected, (i, method, params)
    assert len(got) == (3 if method == "pdrop" else 2)
    assert all(len(a[0]) < len(b[0]) for a, b in zip(got[1:], got[:-1]))  # each stage drops more


def test_plain_reference_loop_reproduces_the_model():
    model, proc = _build("llava", "eager")
    assert reference_kept(model, tiny.single(proc, 0), {}, "pdrop", "keep") == []


# ---------------------------------------------------------------- exactness, budgets, paper settings


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_full_budget_is_exact(kind, attn):
    model, proc = _build(kind, attn)
    inputs = tiny.batch(proc, SIZES[kind])
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref_tokens = tiny.greedy(model, inputs)
    for method in ("pdrop", "feather"):
        with tokenprune.patch(model, method, budget=1.0) as handle:
            with torch.no_grad():
                assert torch.equal(model(**inputs).logits, ref_logits), method
            assert torch.equal(tiny.greedy(model, inputs), ref_tokens), method
            assert handle.trace.realized_budget == 1.0 and len(handle.trace.stages) >= 2


@pytest.fixture(scope="module")
def deep():
    model, proc = tiny.llava(layers=32, image=96, patch=8)  # 12x12 = 144 visual tokens, 32 decoder layers
    return model, tiny.batch(proc)


@pytest.mark.parametrize("budget", [0.1, 0.2, 0.35, 0.5])
@pytest.mark.parametrize("method", ["pdrop", "feather"])
def test_realized_budget_close_to_request(deep, method, budget):
    model, inputs = deep
    with tokenprune.patch(model, method, budget=budget) as handle, torch.no_grad():
        model(**inputs)
        trace = handle.trace
    err = abs(trace.realized_budget - budget)
    assert err <= 0.02 or err * 144 <= 1.0, (method, budget, trace.realized_budget)
    layers = [st.layer for st in trace.stages]
    expected = {
        "pdrop": {0.1: [2, 8, 16], 0.2: [2, 8, 16], 0.35: [8, 16, 24], 0.5: [8, 16, 24]},
        "feather": {0.1: [2, 4], 0.2: [5, 10], 0.35: [8, 16], 0.5: [8, 16]},
    }
    assert layers == expected[method][budget]


def test_paper_settings_on_576_tokens():
    model, proc = tiny.llava(layers=32, image=192, patch=8)  # 24x24 = 576 tokens, 32 layers, as LLaVA-1.5-7B
    inputs = tiny.single(proc, 0)
    with torch.no_grad():
        with tokenprune.patch(model, "pdrop", lam=0.5) as handle:
            model(**inputs)
            assert [(s.layer, int(s.counts[0])) for s in handle.trace.stages] == [(8, 288), (16, 144), (24, 72)]
            assert handle.trace.realized_budget == pytest.approx(270 / 576)
        with tokenprune.patch(model, "feather", keep=0.3) as handle:
            model(**inputs)
            s1, s2 = handle.trace.stages
    assert (s1.layer, s2.layer) == (8, 16)
    kept1 = s1.kept[0][s1.kept[0] >= 0]
    grid = torch.tensor([r * 24 + c for r in range(0, 24, 3) for c in range(0, 24, 3)])
    assert torch.isin(grid, kept1).all()  # the 8x8 uniform grid survives stage 1
    assert 172 <= kept1.numel() <= 172 + 64  # int(0.3 * 576) united with the grid
    assert int(s2.counts[0]) == int(kept1.numel() * 0.09)  # 9% of the survivors, not of 576
    assert torch.isin(s2.kept[0][s2.kept[0] >= 0], kept1).all()


def test_default_position_conventions():
    model, _ = tiny.llava()
    anatomy = anatomy_of(model)
    assert {s.positions for s in PyramidDrop().stages(anatomy, 0.5)} == {"renumber"}  # official pdrop code
    assert {s.positions for s in Feather().stages(anatomy, 0.5)} == {"keep"}  # official FEATHER code
    assert {s.positions for s in PyramidDrop().stages(anatomy, 1.0)} == {"keep"}  # nothing dropped


def test_position_convention_changes_the_computation():
    model, proc = tiny.llava()
    inputs = tiny.batch(proc)
    out = {}
    for positions in ("renumber", "keep"):
        with tokenprune.patch(model, "pdrop", lam=0.5, positions=positions), torch.no_grad():
            out[positions] = model(**inputs).logits[:, -1]
    assert not torch.allclose(out["renumber"], out["keep"])


# ---------------------------------------------------------------- KV-cache decoding


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
@pytest.mark.parametrize("method,positions", [("pdrop", "renumber"), ("pdrop", "keep"),
                                              ("feather", "keep"), ("feather", "renumber")])
def test_decode_with_cache_equals_cache_free_recomputation(kind, method, positions):
    model, proc = _build(kind)
    inputs = tiny.batch(proc, SIZES[kind])
    n = 4
    with tokenprune.patch(model, method, budget=0.5, positions=positions) as handle, torch.no_grad():
        tokens, step_logits = tiny.generate_logits(model, inputs, n)
        plan = tuple((st.layer, tuple(tuple(r[r >= 0].tolist()) for r in st.kept)) for st in handle.trace.stages)
    with tokenprune.patch(model, tiny.Fixed(plan=plan, positions=positions)):
        for t in range(n):
            logits = tiny.cache_free_logits(model, inputs, tokens, t)
            assert torch.allclose(logits, step_logits[:, t], atol=1e-4), (method, positions, t)


# ---------------------------------------------------------------- helper and errors


def test_stride_grid_per_partition():
    r, c = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    on = stride_grid(r.flatten(), c.flatten(), torch.zeros(576, dtype=torch.long), 3)
    assert int(on.sum()) == 64 and on.view(24, 24)[::3, ::3].all()
    # two groups (a full 4x4 tile and an unpadded tile starting at row 1), plus an excluded token
    row = torch.tensor([0, 0, 0, 0, 3, 3, 1, 1, 4, 0])
    col = torch.tensor([0, 1, 2, 3, 0, 3, 0, 3, 0, 0])
    group = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, -1])
    assert stride_grid(row, col, group, 3).tolist() == [1, 0, 0, 1, 1, 1, 1, 1, 1, 0]


def test_errors_name_the_parameter():
    model, _ = tiny.llava()  # 8 decoder layers
    with pytest.raises(BudgetError, match="budget"):
        tokenprune.patch(model, "pdrop", budget=0.1)
    with pytest.raises(BudgetError, match="budget"):
        tokenprune.patch(model, "pdrop")
    with pytest.raises(MethodArgumentError, match="lam"):
        tokenprune.patch(model, "pdrop", lam=1.5)
    with pytest.raises(MethodArgumentError, match="layers"):
        tokenprune.patch(model, "pdrop", layers=(4, 2), budget=0.5)
    with pytest.raises(MethodArgumentError, match="positions"):
        tokenprune.patch(model, "pdrop", budget=0.5, positions="shift")
    with pytest.raises(MethodArgumentError, match="layers"):
        tokenprune.patch(model, "feather", budget=0.5, layers=(3, 8))
    with pytest.raises(MethodArgumentError, match="stride"):
        tokenprune.patch(model, "feather", budget=0.5, stride=0)
    with pytest.raises(MethodArgumentError, match="keep"):
        tokenprune.patch(model, "feather", keep=1.2)
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert {"pdrop", "feather"} <= set(tokenprune.methods())
