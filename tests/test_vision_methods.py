"""Vision-stage methods (HiRED, VisionZip, ToMe, Expedit clustering) against naive references:
eager attention, plain loops, batch of 2; exactness at budget 1 / r = 0; realised budgets."""

import math

import pytest
import tiny
import torch

import tokenprune
from tokenprune.adapters import anatomy_of
from tokenprune.errors import BudgetError

# ---------------------------------------------------------------- naive helpers


def _head_mean_keys(attn, x):
    """Keys of attention module `attn` on normalised input x (T, D), averaged over heads: (T, d)."""
    k = attn.k_proj(x)
    return k.view(x.shape[0], -1, attn.head_dim).mean(1)


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def _naive_tome(x, size, orig, metric, r, cls):
    """One ToMe merge of one sample with loops. x (T, D) incl. CLS if `cls`; metric (T, d)."""
    t = x.shape[0]
    a_idx = [i for i in range(t) if i % 2 == 0 and not (cls and i == 0)]
    b_idx = [i for i in range(t) if i % 2 == 1]
    edges = []
    for i in a_idx:
        sims = [_cos(metric[i], metric[j]) for j in b_idx]
        best = max(range(len(b_idx)), key=lambda q: (sims[q], -q))
        edges.append((sims[best], i, b_idx[best]))
    edges.sort(key=lambda e: -e[0])  # stable: ties keep A order
    src = {i: j for _, i, j in edges[:r]}
    groups = {j: [j] for j in range(t) if j not in src}
    for i, j in src.items():
        groups[j].append(i)
    keep = sorted(groups)
    new_x = torch.stack([sum(x[i] * size[i] for i in groups[j]) / sum(size[i] for i in groups[j]) for j in keep])
    new_size = [sum(size[i] for i in groups[j]) for j in keep]
    off = int(cls)
    new_orig = [orig[j - off] for j in keep if j >= off]
    return new_x, new_size, new_orig


def _vit_by_hand(model, px, at_layer):
    """Run a ViT classifier layer by layer; `at_layer(i, h, prev)` may replace the tokens (and size)."""
    vit = model.vit
    h = vit.embeddings(px)
    prev, bias = None, None
    for i, block in enumerate(vit.layers):
        if i > 0:
            res = at_layer(i, h, prev)
            if res is not None:
                h, sizes = res
                bias = None if sizes is None else sizes.log()[:, None, None, :]
        prev = (block, h)
        h = block(h, bias)
    return vit.layernorm(h)


def _assert_rows_in_order(x, feats, atol):
    """Every row of `feats` (K, D) is a row of the LLM input `x` (L, D), in the same order."""
    where = [int((x - f).abs().amax(-1).argmin()) for f in feats]
    assert torch.allclose(x[where], feats, atol=atol)
    assert where == sorted(where) and len(set(where)) == len(where)


# ---------------------------------------------------------------- ToMe


def _tome_reference(model, px, schedule, cls=True):
    state = {"size": [[1.0] * 65 for _ in range(px.shape[0])], "orig": [list(range(64)) for _ in range(px.shape[0])]}

    def at_layer(i, h, prev):
        r = schedule[i - 1]
        if r == 0:
            return None
        block, h_prev = prev
        out, sizes = [], []
        for b in range(h.shape[0]):
            metric = _head_mean_keys(block.attention, block.layernorm_before(h_prev[b]))
            x, s, o = _naive_tome(h[b], state["size"][b], state["orig"][b], metric, r, cls)
            state["size"][b], state["orig"][b] = s, o
            out.append(x)
            sizes.append(torch.tensor(s))
        return torch.stack(out), torch.stack(sizes)

    final = _vit_by_hand(model, px, at_layer)
    return model.classifier(final[:, 0]), state["orig"]


def test_tome_matches_naive_reference_on_vit():
    model = tiny.vit()
    model.set_attn_implementation("eager")
    px = torch.randn(2, 3, 32, 32)
    schedule = [10, 8, 8, 6, 4]
    with torch.no_grad():
        ref_logits, ref_orig = _tome_reference(model, px, schedule)
        with tokenprune.patch(model, "tome", r=schedule) as handle:
            logits = model(pixel_values=px).logits
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert handle.trace.stages[-1].kept.tolist() == ref_orig
    assert handle.trace.visual_tokens_per_layer == [64, 54, 46, 38, 32, 28]


def test_tome_mid_layer_placement_matches_naive_reference():
    """ToMe's own placement: merge between attention and MLP, the MLP runs on the merged tokens."""
    model = tiny.vit()
    model.set_attn_implementation("eager")
    px = torch.randn(2, 3, 32, 32)
    schedule = [12, 10, 8, 6, 0]
    with torch.no_grad():
        vit = model.vit
        h = vit.embeddings(px)
        out = []
        for b in range(2):
            x, size, orig, bias = h[b:b + 1], [1.0] * 65, list(range(64)), None
            for i, block in enumerate(vit.layers):
                normed = block.layernorm_before(x)
                x = x + block.attention(normed, bias)[0]
                r = schedule[i] if i < len(schedule) else 0
                if r:
                    metric = _head_mean_keys(block.attention, normed[0])
                    y, size, orig = _naive_tome(x[0], size, orig, metric, r, True)
                    x, bias = y[None], torch.tensor(size).log()[None, None, None, :]
                x = x + block.mlp(block.layernorm_after(x))
            out.append(model.classifier(vit.layernorm(x)[:, 0]))
        ref = torch.cat(out)
        with tokenprune.patch(model, "tome", r=schedule, placement="mid") as handle:
            logits = model(pixel_values=px).logits
        between = tokenprune.patch(model, "tome", r=schedule)
        other = model(pixel_values=px).logits
        between.remove()
    assert torch.allclose(logits, ref, atol=1e-5)
    assert not torch.allclose(other, ref, atol=1e-4)  # merging after the MLP is a different placement
    assert handle.trace.visual_tokens_per_layer == [64, 52, 42, 34, 28, 28]


@pytest.mark.parametrize("budget", [0.4, 0.5, 0.75])
def test_tome_budget_is_realised_on_encoders(budget):
    for model, placement in [(tiny.vit(), "input"), (tiny.clip_vision(), "mid"), (tiny.siglip_vision(), "input"),
                             (tiny.siglip_vision(), "mid")]:
        with tokenprune.patch(model, "tome", budget=budget, placement=placement) as handle, torch.no_grad():
            model(pixel_values=torch.randn(2, 3, 32, 32))
        realised = handle.trace.realized_budget
        assert abs(realised - budget) <= max(0.02 * budget, 1 / (64 * 6)), (type(model).__name__, realised)


def test_tome_unreachable_budget_is_a_budget_error():
    with pytest.raises(BudgetError, match="budget"):
        tokenprune.patch(tiny.vit(), "tome", budget=0.25)  # 6 layers, one halving each: >= 0.33
    with pytest.raises(BudgetError, match="rounds"):
        tokenprune.patch(tiny.llava()[0], "tome", budget=0.2)  # one merge in a 3-layer tower: >= 0.5
    handle = tokenprune.patch(tiny.vit(), "tome", budget=0.25, rounds=2)  # extension reaches it
    handle.remove()


def test_tome_inside_llava_tower_matches_hand_run_tower():
    model, proc = tiny.llava()
    model.set_attn_implementation("eager")
    inputs = tiny.batch(proc)
    seen = {}
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["inputs_embeds"]), with_kwargs=True)
    try:
        with tokenprune.patch(model, "tome", budget=0.5) as handle, torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    tower = model.model.vision_tower
    with torch.no_grad():
        h = tower.pre_layrnorm(tower.embeddings(inputs["pixel_values"]))
        layer0, layer1 = tower.encoder.layers[0], tower.encoder.layers[1]
        h0 = layer0(h, None)
        feats, origs = [], []
        for b in range(2):
            metric = _head_mean_keys(layer0.self_attn, layer0.layer_norm1(h[b]))
            x, s, o = _naive_tome(h0[b], [1.0] * 17, list(range(16)), metric, 8, True)
            out = layer1(x[None], torch.tensor(s).log()[None, None, None, :])
            feats.append(model.model.multi_modal_projector(out[0, 1:]))
            origs.append(o)
    assert handle.trace.stages[0].kept.tolist() == origs
    for b in range(2):
        _assert_rows_in_order(seen["x"][b], feats[b], atol=1e-4)
    assert handle.trace.realized_budget == 0.5


# ---------------------------------------------------------------- clustering


def _naive_cluster(x, rows, cols, hc, wc, radius, iters, tau, k):
    """Expedit clustering of one sample's patch tokens x (P, D) with loops: (centres, weights)."""
    cells = []
    for a in range(hc):
        for c in range(wc):
            r0, r1 = (a * rows) // hc, -(-((a + 1) * rows) // hc)
            c0, c1 = (c * cols) // wc, -(-((c + 1) * cols) // wc)
            idx = [y * cols + z for y in range(r0, r1) for z in range(c0, c1)]
            cells.append(x[idx].mean(0))
    centres = torch.stack(cells)
    label = [(y * hc // rows) * wc + (z * wc // cols) for y in range(rows) for z in range(cols)]
    allowed = [[abs(label[j] // wc - m // wc) <= radius and abs(label[j] % wc - m % wc) <= radius
                for m in range(hc * wc)] for j in range(rows * cols)]
    for _ in range(iters):
        aff = torch.zeros(rows * cols, hc * wc)
        for j in range(rows * cols):
            logits = torch.tensor([-tau * float(((x[j] - centres[m]) ** 2).sum()) if allowed[j][m] else -math.inf
                                   for m in range(hc * wc)])
            aff[j] = logits.softmax(0)
        centres = torch.stack([(aff[:, m, None] * x).sum(0) / aff[:, m].sum() for m in range(hc * wc)])
    w = torch.zeros(rows * cols, hc * wc)
    for j in range(rows * cols):
        d = torch.tensor([float(((x[j] - centres[m]) ** 2).sum()) for m in range(hc * wc)])
        e = torch.exp(-tau * d)
        kth = e.topk(k).values[-1]
        e = torch.where(e >= kth, e, torch.zeros_like(e))
        w[j] = e / e.norm()
    return centres, w


def test_cluster_matches_naive_reference_and_keeps_every_patch():
    model = tiny.vit()
    model.set_attn_implementation("eager")
    px = torch.randn(2, 3, 32, 32)
    params = dict(alpha=2, beta=4, clusters=(4, 4), iters=2, temperature=0.05, window=3, k=5)
    saved = {}

    def at_layer(i, h, prev):
        if i == 2:
            out = []
            for b in range(2):
                c, w = _naive_cluster(h[b, 1:], 8, 8, 4, 4, 1, 2, 0.05, 5)
                saved[b] = w
                out.append(torch.cat([h[b, :1], c]))
            return torch.stack(out), None
        if i == 4:
            return torch.stack([torch.cat([h[b, :1], saved[b] @ h[b, 1:]]) for b in range(2)]), None
        return None

    with torch.no_grad():
        ref = _vit_by_hand(model, px, at_layer)
        with tokenprune.patch(model.vit, "cluster", **params) as handle:
            out = model.vit(pixel_values=px).last_hidden_state
    assert out.shape == ref.shape == (2, 65, 32)
    assert torch.allclose(out, ref, atol=1e-5)
    first, second = handle.trace.stages
    assert first.kept[0].tolist() == [9, 11, 13, 15, 25, 27, 29, 31, 41, 43, 45, 47, 57, 59, 61, 63]
    assert second.kept.tolist() == [list(range(64))] * 2
    assert handle.trace.visual_tokens_per_layer == [64, 64, 16, 16, 64, 64]


def test_cluster_budget_sets_the_grid():
    model = tiny.vit()
    with tokenprune.patch(model, "cluster", budget=0.6, alpha=1, beta=5) as handle, torch.no_grad():
        model(pixel_values=torch.randn(2, 3, 32, 32))
    assert abs(handle.trace.realized_budget - 0.6) < 0.02 * 0.6
    with pytest.raises(BudgetError):
        tokenprune.patch(model, "cluster", budget=0.3, alpha=2, beta=4)


# ---------------------------------------------------------------- HiRED


def _tower_cls(model, pixel_values, layers):
    """CLS attention (summed over heads) and outputs of a LLaVA tower's layers, eager."""
    out = model.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True)
    return out, {i: out.attentions[i][:, :, 0].sum(1) for i in layers}


def _top(scores, members, k):
    return sorted(sorted(members, key=lambda j: (-float(scores[j]), j))[:k])


def test_hired_matches_naive_reference_on_llava_next():
    model, proc = tiny.llava_next()
    model.set_attn_implementation("eager")
    inputs = tiny.batch(proc, sizes=((40, 70), (64, 32)))
    budget, alpha = 0.3, 0.5
    with tokenprune.patch(model, "hired", budget=budget) as handle, torch.no_grad():
        model(**inputs)
        n_tiles = [5, 3]
        tiles = torch.cat([pv[:n] for pv, n in zip(inputs["pixel_values"], n_tiles)])
        _, att = _tower_cls(model, tiles, [0, 1])
    anatomy = anatomy_of(model)
    lengths = (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist()
    layouts = anatomy.layouts(lengths, {"image_sizes": inputs["image_sizes"]})
    first = [0, 5]
    expected = []
    for b, lay in enumerate(layouts):
        def score(layer, j, lay=lay, b=b):
            return att[layer][first[b] + int(lay.tile[j]), 1 + int(lay.row[j]) * 4 + int(lay.col[j])]

        n = lay.num_tokens
        total = round(budget * n)
        base = [j for j in range(n) if lay.tile[j] == 0]
        subs = [[j for j in range(n) if lay.tile[j] == t] for t in range(1, n_tiles[b])]
        full = min(int(total * alpha), len(base))
        sub = min(total - full, sum(len(s) for s in subs))
        early = {j: score(0, j) for j in base}
        marked = _top(early, base, int(len(base) * (1 - alpha)))
        counts = [0] * len(subs)
        for j in marked:
            counts[base.index(j) * len(subs) // len(base)] += 1
        exact = [sub * c / sum(counts) for c in counts]
        shares = [int(e) for e in exact]
        for i in sorted(range(len(subs)), key=lambda i: exact[i] - int(exact[i]), reverse=True)[: sub - sum(shares)]:
            shares[i] += 1
        late = {j: score(1, j) for j in range(n) if lay.tile[j] >= 0}
        kept = _top(late, base, full) + [j for s, k in zip(subs, shares) for j in _top(late, s, k)]
        expected.append(sorted(kept))
    kept = handle.trace.stages[0].kept
    assert [row[row >= 0].tolist() for row in kept] == expected
    assert all(abs(int(c) - round(budget * n)) <= 0 for c, n in zip(handle.trace.stages[0].counts, lengths))


def test_hired_on_llava_is_top_k_of_feature_layer_cls_attention():
    model, proc = tiny.llava()
    model.set_attn_implementation("eager")
    inputs = tiny.batch(proc)
    with tokenprune.patch(model, "hired", budget=0.25) as handle, torch.no_grad():
        model(**inputs)
        _, att = _tower_cls(model, inputs["pixel_values"], [1])
    expected = [_top(att[1][b, 1:], list(range(16)), 4) for b in range(2)]
    assert handle.trace.stages[0].kept.tolist() == expected


# ---------------------------------------------------------------- VisionZip


def test_visionzip_matches_naive_reference_on_llava():
    model, proc = tiny.llava()
    model.set_attn_implementation("eager")
    inputs = tiny.batch(proc)
    seen = {}
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["inputs_embeds"]), with_kwargs=True)
    try:
        with tokenprune.patch(model, "visionzip", budget=0.75) as handle, torch.no_grad():
            model(**inputs)
            out, att = _tower_cls(model, inputs["pixel_values"], [1])
    finally:
        hook.remove()
    layer = model.model.vision_tower.encoder.layers[1]
    expected_pos, expected_feats = [], []
    with torch.no_grad():
        for b in range(2):
            hidden = out.hidden_states[2][b, 1:]
            keys = _head_mean_keys(layer.self_attn, layer.layer_norm1(out.hidden_states[1][b]))[1:]
            k = round(0.75 * 16)
            n_ctx = round(k * 10 / 64)
            dom = _top(att[1][b, 1:], list(range(16)), k - n_ctx)
            rest = [j for j in range(16) if j not in dom]
            step = max(1, len(rest) // n_ctx)
            targets = rest[::step][:n_ctx]
            others = [j for j in rest if j not in targets]
            groups = {t: [] for t in targets}
            for j in others:
                groups[max(targets, key=lambda t: (_cos(keys[j], keys[t]), -targets.index(t)))].append(j)
            feats = {j: model.model.multi_modal_projector(hidden[j]) for j in dom}
            for t, js in groups.items():
                merged = hidden[t] + (sum(hidden[j] for j in js) / max(1, len(js)) if js else 0)
                feats[t] = model.model.multi_modal_projector(merged)
            expected_pos.append(sorted(feats))
            expected_feats.append(torch.stack([feats[j] for j in sorted(feats)]))
    assert handle.trace.stages[0].kept.tolist() == expected_pos
    for b in range(2):
        _assert_rows_in_order(seen["x"][b], expected_feats[b], atol=1e-5)


@pytest.mark.parametrize("budget", [0.1, 0.2, 0.35, 0.5])
def test_pre_llm_budgets_are_realised_on_llava_next(budget):
    model, proc = tiny.llava_next()
    inputs = tiny.batch(proc, sizes=((40, 70), (64, 32)))
    for method in ("hired", "visionzip"):
        with tokenprune.patch(model, method, budget=budget) as handle, torch.no_grad():
            model(**inputs)
        counts, unpruned = handle.trace.stages[0].counts, handle.trace.unpruned
        assert ((counts - (budget * unpruned).round()).abs() <= 1).all(), (method, counts, unpruned)
        assert abs(handle.trace.realized_budget - budget) <= max(0.02 * budget, 1 / float(unpruned.min()))


# ---------------------------------------------------------------- exactness at budget 1


def test_full_budget_is_exact():
    px = torch.randn(2, 3, 32, 32)
    model = tiny.vit()
    with torch.no_grad():
        ref = model(pixel_values=px).logits
        for method, params in [("tome", {"budget": 1.0}), ("tome", {"r": 0}), ("cluster", {"budget": 1.0})]:
            with tokenprune.patch(model, method, **params):
                assert torch.equal(model(pixel_values=px).logits, ref), method
    for build, sizes in [(tiny.llava, ((40, 48), (32, 32))), (tiny.llava_next, ((40, 70), (64, 32)))]:
        model, proc = build()
        inputs = tiny.batch(proc, sizes=sizes)
        with torch.no_grad():
            ref = model(**inputs).logits
        ref_tokens = tiny.greedy(model, inputs, 3)
        methods = ["hired", "visionzip"] + (["tome"] if build is tiny.llava else [])
        for method in methods:
            with tokenprune.patch(model, method, budget=1.0):
                with torch.no_grad():
                    assert torch.equal(model(**inputs).logits, ref), method
                assert torch.equal(tiny.greedy(model, inputs, 3), ref_tokens), method
