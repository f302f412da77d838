"""The 2025 methods (issue #21: DivPrune, Pool, DART, VisPruner, CDPruner) against plain-loop
references of their official algorithms on tiny LLaVA / LLaVA-NeXT models: padded batches and
samples with several images; budget 1.0 exact; realised budgets; typed refusals."""

import math

import pytest
import tiny
import torch

import tokenprune
from tokenprune.adapters import anatomy_of

SIZES = {"llava": ((40, 48), (32, 32)), "llava_next": ((40, 70), (64, 32))}
MULTI = ["USER: <image>\n<image>\nhow many shapes are there? ASSISTANT:", "USER: <image>\ndescribe it. ASSISTANT:"]


def _model(kind, **kw):
    return tiny.llava(**kw) if kind == "llava" else tiny.llava_next(**kw)


def _inputs(kind, proc, multi):
    """A padded batch of two samples; ``multi``: the first sample has two images."""
    if not multi:
        return tiny.batch(proc, SIZES[kind])
    imgs = [tiny.image(40, 48, 1), tiny.image(32, 64, 2), tiny.image(32, 32, 3)]
    return proc(images=imgs, text=MULTI, return_tensors="pt", padding=True)


def _images(model, inputs):
    """Per sample, per image: (projected features as they enter the LLM (n, D), layout)."""
    core = model.model
    extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
    with torch.no_grad():
        feats = core.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-2,
                                        vision_feature_select_strategy="default", return_dict=True,
                                        **extra).pooler_output
    layouts = anatomy_of(model).layouts([f.shape[0] for f in feats], inputs.get("image_sizes"))
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist()
    out, i = [], 0
    for c in counts:
        row = []
        while c > 0:
            row.append((feats[i], layouts[i]))
            c -= feats[i].shape[0]
            i += 1
        out.append(row)
    return out


def _kept(handle):
    return [row[row >= 0].tolist() for row in handle.trace.stages[-1].kept]


def _run(model, inputs, method, **params):
    with tokenprune.patch(model, method, **params) as handle, torch.no_grad():
        model(**inputs)
    return handle


def _llm_visual_inputs(model, inputs, method, **params):
    """Per sample, the visual rows of the LLM's input embeddings in a patched forward, and the trace."""
    seen = {}
    with tokenprune.patch(model, method, **params) as handle, torch.no_grad():
        core = model.model

        def ids(m, a, kw):
            seen["ids"] = kw.get("input_ids", a[0] if a else None)

        def embeds(m, a, kw):
            seen["x"] = kw["inputs_embeds"]

        hooks = [core.register_forward_pre_hook(ids, with_kwargs=True),
                 core.language_model.register_forward_pre_hook(embeds, with_kwargs=True)]
        try:
            model(**inputs)
        finally:
            for h in hooks:
                h.remove()
    is_img = seen["ids"] == model.config.image_token_id
    return [seen["x"][b][is_img[b]] for b in range(is_img.shape[0])], handle


# ---------------------------------------------------------------- DivPrune


def _naive_divprune(x, k):
    n = x.shape[0]
    xn = x / x.norm(dim=-1, keepdim=True)
    d = (1 - xn @ xn.T).tolist()
    second = [sorted(d[i][j] for i in range(n))[1] if n > 1 else math.inf for j in range(n)]
    chosen = [max(range(n), key=lambda j: (second[j], -j))]
    while len(chosen) < k:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: (min(d[s][j] for s in chosen), -j)))
    return chosen


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_divprune_matches_plain_loop(kind, multi):
    model, proc = _model(kind)
    inputs = _inputs(kind, proc, multi)
    budget = 0.3
    handle = _run(model, inputs, "divprune", budget=budget)
    expected = []
    for row in _images(model, inputs):
        kept, off = [], 0
        for feats, _ in row:
            n = feats.shape[0]
            kept += [off + j for j in _naive_divprune(feats, round(budget * n))]
            off += n
        expected.append(sorted(kept))
    assert _kept(handle) == expected


# ---------------------------------------------------------------- Pool


def _naive_pool(feats, lay, k_total):
    """Plain-loop pool of one image: (kept centre indices, their mean features)."""
    crops = [[j for j in range(lay.num_tokens) if int(lay.tile[j]) == t] for t in sorted(set(lay.tile.tolist()))
             if t >= 0]
    sizes = [len(c) for c in crops]
    exact = [k_total * s / sum(sizes) for s in sizes]
    shares = [math.floor(e) for e in exact]
    for i in sorted(range(len(crops)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True):
        if sum(shares) < k_total:
            shares[i] += 1
    out = []
    for crop, k in zip(crops, shares):
        if k == 0:
            continue
        grid = {(int(lay.row[j]), int(lay.col[j])): j for j in crop}
        r_lo, c_lo = min(r for r, _ in grid), min(c for _, c in grid)
        rows, cols = max(r for r, _ in grid) - r_lo + 1, max(c for _, c in grid) - c_lo + 1
        a = min(rows, k, max(math.ceil(k / cols), round(math.sqrt(k * rows / cols))))
        bands = [k // a + (1 if i < k % a else 0) for i in range(a)]
        for i, m in enumerate(bands):
            r0, r1 = i * rows // a, (i + 1) * rows // a
            for w in range(m):
                c0, c1 = w * cols // m, (w + 1) * cols // m
                members = [grid[(r_lo + r, c_lo + c)] for r in range(r0, r1) for c in range(c0, c1)]
                centre = grid[(r_lo + (r0 + r1 - 1) // 2, c_lo + (c0 + c1 - 1) // 2)]
                out.append((centre, feats[members].mean(0)))
    return sorted(out, key=lambda t: t[0])


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_pool_matches_plain_loop(kind, multi):
    model, proc = _model(kind)
    inputs = _inputs(kind, proc, multi)
    budget = 0.3
    x, handle = _llm_visual_inputs(model, inputs, "pool", budget=budget)
    assert handle.trace.stages[0].info == {"position": "window centre"}
    kept = _kept(handle)
    for b, row in enumerate(_images(model, inputs)):
        expected, off = [], 0
        for feats, lay in row:
            n = feats.shape[0]
            expected += [(off + j, f) for j, f in _naive_pool(feats, lay, round(budget * n))]
            off += n
        assert kept[b] == [j for j, _ in expected]
        assert torch.allclose(x[b], torch.stack([f for _, f in expected]), atol=1e-6)


def test_pool_windows_cover_the_grid_once():
    from tokenprune.methods.pool import windows

    for rows, cols in [(14, 14), (4, 3), (7, 2), (1, 5)]:
        for k in range(1, rows * cols + 1):
            seen = torch.zeros(rows, cols, dtype=torch.long)
            ws = windows(rows, cols, k)
            assert len(ws) == k
            for r0, r1, c0, c1 in ws:
                assert r1 > r0 and c1 > c0
                seen[r0:r1, c0:c1] += 1
            assert bool((seen == 1).all()), (rows, cols, k)


# ---------------------------------------------------------------- every method: budget 1.0, realised budgets

PRE_LLM = ["divprune", "pool"]


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_full_budget_is_exact(kind):
    model, proc = _model(kind)
    for multi in (False, True):
        inputs = _inputs(kind, proc, multi)
        with torch.no_grad():
            ref = model(**inputs).logits
        ref_tokens = tiny.greedy(model, inputs, 3)
        for method in PRE_LLM:
            with tokenprune.patch(model, method, budget=1.0):
                with torch.no_grad():
                    assert torch.equal(model(**inputs).logits, ref), method
                assert torch.equal(tiny.greedy(model, inputs, 3), ref_tokens), method


@pytest.mark.parametrize("budget", [0.1, 0.2, 0.35, 0.5])
def test_pre_llm_budgets_are_realised(budget):
    model, proc = tiny.llava(image=64)  # 64 visual tokens per image
    inputs = _inputs("llava", proc, True)
    for method in PRE_LLM:
        handle = _run(model, inputs, method, budget=budget)
        assert abs(handle.trace.realized_budget - budget) <= 0.02 * budget + 0.5 / 64, (method, budget)
