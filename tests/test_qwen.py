"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (issue #18): tiny random-weight models from configs.

Packed vision tower, 2x2 merged units as visual tokens, M-RoPE (3, B, L) positions that kept tokens
keep, ``mm_token_type_ids`` compacted with ``input_ids``, Qwen3-VL deepstack features pruned with
their tokens."""

import importlib
import re

import pytest
import tiny
import torch
from transformers import AttentionInterface
from transformers.vision_utils import get_vision_window_index

import tokenprune
from tokenprune import flops
from tokenprune.errors import SiteError, TokenPruneError
from tokenprune.methods import REGISTRY

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
SERVED = {"random", "uniform", "fastv", "pdrop", "feather", "hired", "visionzip", "early_exit"}  # run on Qwen
FULL = {"early_exit": {"threshold": None}}  # full-budget settings of methods that take no budget


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


def _model(family: str, attn: str = "sdpa"):
    model = getattr(tiny, family)()
    model.set_attn_implementation(attn)
    return model


def _row(inputs: dict, b: int) -> dict:
    """Sample ``b`` of a left-padded batch on its own (padding removed, its images only)."""
    real = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b: b + 1, real] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for kind, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        grid = inputs.get(f"{kind}_grid_thw")
        if grid is None:
            continue
        types = inputs["mm_token_type_ids"]
        code = 1 if kind == "image" else 2
        per_item = (grid.prod(-1) // 4).tolist()
        counts = [int((t == code).sum()) for t in types]
        first = sum(counts[:b])
        items, seen = [], 0
        for i, n in enumerate(per_item):
            if first <= seen < first + counts[b]:
                items.append(i)
            seen += n
        if not items:
            continue
        patch_counts = grid.prod(-1).tolist()
        start = sum(patch_counts[: items[0]])
        stop = start + sum(patch_counts[i] for i in items)
        out[pixels] = inputs[pixels][start:stop]
        out[f"{kind}_grid_thw"] = grid[items]
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_method_is_exact_at_full_budget_or_refused(family, attn):
    model = _model(family, attn)
    inputs = tiny.qwen_batch()
    ref_tokens, ref_logits = tiny.generate_logits(model, inputs)
    with torch.no_grad():
        ref = model(**inputs).logits
    served = set()
    for name in sorted(REGISTRY):
        try:
            handle = tokenprune.patch(model, name, **FULL.get(name, {"budget": 1.0}))
        except TokenPruneError as err:  # a typed refusal at patch(), naming the parameter
            assert name not in SERVED, (name, err)
            assert re.match(r"^[a-z_]+: ", str(err)), err
            continue
        with handle:
            with torch.no_grad():
                assert torch.equal(model(**inputs).logits, ref), name
            tokens, logits = tiny.generate_logits(model, inputs)
            assert torch.equal(tokens, ref_tokens), name
            assert torch.equal(logits, ref_logits), name
            assert handle.trace.realized_budget == 1.0, name
        served.add(name)
    assert SERVED <= served


def _hooks(model) -> set:
    return {(name, k) for name, m in model.named_modules() for d in (m._forward_pre_hooks, m._forward_hooks) for k in d}


def test_remove_restores_exactly(family):
    model = _model(family)
    inputs = tiny.qwen_batch()
    ref_tokens, ref_logits = tiny.generate_logits(model, inputs)
    hooks_before = _hooks(model)
    handle = tokenprune.patch(model, "fastv", budget=0.4)
    pruned, _ = tiny.generate_logits(model, inputs)
    handle.remove()
    tokens, logits = tiny.generate_logits(model, inputs)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)
    assert _hooks(model) == hooks_before
    assert "get_image_features" not in model.model.__dict__
    assert pruned.shape == ref_tokens.shape


CASES = [
    ("random", {}),
    ("uniform", {}),
    ("fastv", {}),
    ("uniform", {"site": "llm", "layer": 1}),
]


def _samples(kind: str) -> list[list]:
    a, b = tiny.QWEN_PROMPTS[0].split("{}"), tiny.QWEN_PROMPTS[1].split("{}")
    if kind == "sizes":  # two images of different sizes: different token counts, left padding
        return [[a[0], ("image", (40, 72)), a[1]], [b[0], ("image", (32, 32)), b[1]]]
    if kind == "two_images":
        return [[a[0], ("image", (40, 40)), " and ", ("image", (32, 48)), a[1]], [b[0], ("image", (32, 32)), b[1]]]
    return [[a[0], ("video", (4, 32, 48)), a[1]], [b[0], ("image", (48, 32)), b[1]]]  # video: 2 frames, 2 x 3 units


@pytest.mark.parametrize("kind", ["sizes", "two_images", "video"])
@pytest.mark.parametrize("method,params", CASES)
def test_batch_equals_samples_alone(family, kind, method, params):
    model = _model(family)
    inputs = tiny.qwen_inputs(_samples(kind), timestamps=family == "qwen3_vl")
    with tokenprune.patch(model, method, budget=0.5, **params) as handle:
        tokens, logits = tiny.generate_logits(model, inputs)
        kept = handle.trace.stages[-1].kept
        assert 0.45 < handle.trace.realized_budget < 0.6
        for b in range(2):
            alone_tokens, alone_logits = tiny.generate_logits(model, _row(inputs, b))
            assert torch.equal(tokens[b: b + 1], alone_tokens), (b, kind)
            assert torch.allclose(logits[b: b + 1], alone_logits, atol=1e-4), (b, kind)
            alone = handle.trace.stages[-1].kept[0]
            assert torch.equal(alone[alone >= 0], kept[b][kept[b] >= 0]), (b, kind)


def test_video_tokens_are_pruned_per_frame(family):
    model = _model(family)
    inputs = tiny.qwen_inputs(_samples("video"), timestamps=family == "qwen3_vl")
    with tokenprune.patch(model, "uniform", budget=0.5) as handle:
        tiny.generate_logits(model, inputs, 2)
    meta = handle.trace.meta
    frames = meta["frame"][0]
    assert frames.tolist() == [0] * 6 + [1] * 6  # 4 frames / temporal patch 2 = 2 frames of 2 x 3 units
    kept = handle.trace.stage("uniform").kept[0]
    kept = kept[kept >= 0]
    per_frame = torch.bincount(frames[kept], minlength=2).tolist()
    assert per_frame == [3, 3]  # uniform spreads the budget evenly over the frames


def _reference_logits(model, inputs, kept: torch.Tensor, n: int):
    """The unpatched language model on inputs_embeds with the non-kept visual tokens removed, every
    kept token at its ORIGINAL 3-D position, then greedy decoding with the unpruned continuation."""
    core = model.model
    ids = inputs["input_ids"]
    with torch.no_grad():
        out = core.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        embeds = core.get_input_embeddings()(ids)
        is_img = ids == model.config.image_token_id
        embeds = embeds.masked_scatter(is_img[..., None], torch.cat(out.pooler_output)[None])
        pos, delta = core.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs["image_grid_thw"])
        img_cols = is_img[0].nonzero().flatten()
        cols = torch.cat([(~is_img[0]).nonzero().flatten(), img_cols[kept]]).sort().values
        extra = {}
        if getattr(out, "deepstack_features", None) is not None:  # Qwen3-VL: kept tokens' deepstack features
            extra = {"visual_pos_masks": is_img[:, cols],
                     "deepstack_visual_embeds": [torch.cat(f)[kept] for f in out.deepstack_features]}
        lm = core.language_model
        h = lm(inputs_embeds=embeds[:, cols], position_ids=pos[:, :, cols], use_cache=True, **extra)
        cache, steps = h.past_key_values, [model.lm_head(h.last_hidden_state)]
        for t in range(n - 1):
            nxt = steps[-1][:, -1].argmax(-1, keepdim=True)
            p = (torch.tensor([[ids.shape[1] + t]]) + delta)[None].expand(3, -1, -1)
            h = lm(inputs_embeds=core.get_input_embeddings()(nxt), position_ids=p, past_key_values=cache,
                   use_cache=True)
            steps.append(model.lm_head(h.last_hidden_state))
    return steps


@pytest.mark.parametrize("method", ["random", "uniform"])
def test_pre_llm_pruning_equals_independent_reference(family, method):
    model = _model(family)
    inputs = tiny.qwen_inputs(_samples("sizes")[:1])
    with tokenprune.patch(model, method, budget=0.3) as handle:
        with torch.no_grad():
            prefill = model(**inputs).logits
        tokens, logits = tiny.generate_logits(model, inputs, 4)
    kept = handle.trace.stage(method).kept[0]
    steps = _reference_logits(model, inputs, kept, 4)
    assert torch.allclose(prefill, steps[0], atol=1e-4)
    assert torch.allclose(logits[0], torch.cat([s[:, -1] for s in steps]), atol=1e-4)
    assert tokens[0].tolist() == [int(s[0, -1].argmax()) for s in steps]


def test_fastv_keeps_the_eager_top_k(family):
    model = _model(family, "eager")
    inputs = tiny.qwen_batch()
    k = 2
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[k - 1][:, :, -1].mean(1)  # (B, L)
    with tokenprune.patch(model, "fastv", k=k, r=0.6) as handle, torch.no_grad():
        model(**inputs)
    is_img = inputs["input_ids"] == model.config.image_token_id
    for b in range(2):
        kept = handle.trace.stage("fastv").kept[b]
        kept = kept[kept >= 0]
        scores = att[b][is_img[b]]
        want = scores.topk(kept.numel()).indices.sort().values
        assert kept.numel() == round(0.4 * int(is_img[b].sum()))
        assert torch.equal(kept, want), b


@pytest.mark.parametrize("site,layer", [("llm", 1), ("llm", 3), ("pre_llm", -1)])
def test_cache_decode_equals_cache_free_recomputation(family, site, layer):
    """Kept set fixed; every decode step's logits equal a cache-free run of the prompt plus the
    generated tokens (positions from the model's own rope index on the unpruned sequence). At
    layer 1, Qwen3-VL's deepstack addition after layer 1 acts on the pruned sequence."""
    model = _model(family)
    inputs = tiny.qwen_batch(sizes=((96, 128), (64, 64)))  # 48 and 16 merged units
    kept = ((0, 2, 3, 7, 8, 15, 20, 31), (1, 4, 5, 9))
    n = 4
    with tokenprune.patch(model, tiny.Fixed(kept=kept, site=site, layer=layer)) as handle:
        tokens, step_logits = tiny.generate_logits(model, inputs, n)
        assert [r[r >= 0].tolist() for r in handle.trace.stage("fixed").kept] == [list(k) for k in kept]
        for t in range(n):
            pad = torch.ones_like(tokens[:, :t])
            extended = {**inputs,
                        "input_ids": torch.cat([inputs["input_ids"], tokens[:, :t]], 1),
                        "attention_mask": torch.cat([inputs["attention_mask"], pad], 1),
                        "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], 0 * pad], 1)}
            with torch.no_grad():
                logits = model(**extended, use_cache=False).logits[:, -1]
            assert torch.allclose(logits, step_logits[:, t], atol=1e-4), t


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("method,params", [("random", {}), ("uniform", {}), ("fastv", {}),
                                           ("pdrop", {"positions": "keep"}), ("uniform", {"site": "llm"}),
                                           ("hired", {}), ("visionzip", {})])
def test_realized_budget_counts_merged_units(family, budget, method, params):
    model = getattr(tiny, family)(layers=16)  # 0.1 is out of reach after layer 1 of 8
    inputs = tiny.qwen_batch(sizes=((96, 128), (64, 64)))  # 12 x 16 and 8 x 8 patches
    n_units = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    with tokenprune.patch(model, method, budget=budget, **params) as handle, torch.no_grad():
        model(**inputs)
    trace = handle.trace
    assert n_units == [48, 16] and trace.unpruned.tolist() == n_units  # a visual token is a 2x2 merged unit
    assert abs(trace.realized_budget - budget) <= max(0.02, 1 / min(n_units)), (method, trace.realized_budget)


def test_refusals_are_typed(family):
    model = _model(family)
    with pytest.raises(SiteError, match="positions"):
        tokenprune.patch(model, "pdrop", budget=0.5)  # renumbering has no 3-D meaning
    with pytest.raises(SiteError, match="packed"):
        tokenprune.patch(model, "tome", budget=0.5)
    with pytest.raises(SiteError, match="packed"):
        tokenprune.patch(model, "random", budget=0.5, site="vision")


def test_deepstack_follows_tokens_dropped_inside_the_llm():
    """Qwen3-VL adds deepstack features after LLM layers 0 and 1: a stage at layer 1 that keeps
    every token reproduces the model exactly (the additions are re-indexed, not misplaced), and
    one that drops tokens adds them to the kept tokens only (a reference without the dropped
    tokens' deepstack rows differs from the dropped ones')."""
    model = _model("qwen3_vl")
    inputs = tiny.qwen_batch()
    n = (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist()
    with torch.no_grad():
        ref = model(**inputs).logits
    every = tuple(tuple(range(k)) for k in n)
    with tokenprune.patch(model, tiny.Fixed(kept=every, layer=1)), torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    calls = []
    lm = model.model.language_model
    original = lm._deepstack_process
    lm._deepstack_process = lambda h, m, e: calls.append((h.shape[1], int(m.sum()), e.shape[0])) or original(h, m, e)
    try:
        with tokenprune.patch(model, tiny.Fixed(kept=((0, 2), (1,)), layer=1)), torch.no_grad():
            model(**inputs)
    finally:
        del lm._deepstack_process
    full = inputs["input_ids"].shape[1]
    assert calls[0] == (full, sum(n), sum(n))  # after layer 0: the whole sequence
    assert calls[1][1:] == (3, 3) and calls[1][0] < full  # after layer 1: the 3 kept visual tokens


def test_received_attention_is_the_towers_own_attention_per_merged_unit():
    """HiRED on Qwen2.5-VL keeps the top units by the attention received at the last
    full-attention block (the tower's own eager weights, mean over queries, summed over heads),
    averaged per 2x2 unit and un-permuted from the window order with argsort(window_index) — the
    same permutation that takes the merger's output to the LLM's order."""
    model = tiny.qwen2_5_vl()
    a = tiny.QWEN_PROMPTS[0].split("{}")
    inputs = tiny.qwen_inputs([[a[0], ("image", (96, 128)), a[1]]])
    visual = model.model.visual
    eager = importlib.import_module(type(visual).__module__).eager_attention_forward
    weights, inside, outputs = [], [], []

    def record(module, q, k, v, attention_mask, **kw):
        out, w = eager(module, q, k, v, attention_mask, **kw)
        if inside:
            weights.append(w)
        return out, w

    AttentionInterface.register("tp_record", record)
    block = visual.blocks[3]  # last of fullatt_block_indexes [1, 3]
    def leave(module, args, out):
        inside.clear()
        outputs.append(out)

    hooks = [block.register_forward_pre_hook(lambda *a: inside.append(1)), block.register_forward_hook(leave)]
    impl, visual.config._attn_implementation = visual.config._attn_implementation, "tp_record"
    try:
        with torch.no_grad():
            pooled = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
    finally:
        visual.config._attn_implementation = impl
        for h in hooks:
            h.remove()
    (w,) = weights  # one image: one full-attention chunk, (1, H, n, n)
    order = torch.argsort(get_vision_window_index(inputs["image_grid_thw"], spatial_merge_size=2, window_size=32,
                                                  patch_size=tiny.QWEN_PATCH)[0])
    with torch.no_grad():
        assert torch.allclose(visual.merger(outputs[0])[order], pooled)  # the permutation's direction
    received = w[0].float().mean(1).sum(0).view(-1, 4).mean(1)[order]
    with tokenprune.patch(model, "hired", budget=0.4) as handle, torch.no_grad():
        model(**inputs)
    kept = handle.trace.stage("hired").kept[0]
    assert torch.equal(kept, received.topk(round(0.4 * 48)).indices.sort().values)


def test_flops_count_the_packed_tower_and_merger(family):
    """Vision + projector MACs of an image and a video (windowed blocks per window, full blocks per
    frame; the 2x2 merger and Qwen3-VL's deepstack mergers) equal what FlopCounterMode counts."""
    model = _model(family)
    inputs = tiny.qwen_inputs(_samples("video"), timestamps=family == "qwen3_vl")
    est = flops.estimate(model, inputs)
    with flops.flop_counter() as counter, torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    assert 2 * sum(e.vision + e.projector for e in est) == counter.get_total_flops()
    assert all(e.vision > 0 and e.projector > 0 for e in est)
    with tokenprune.patch(model, "random", budget=0.25) as handle, torch.no_grad():
        model(**inputs)
    pruned = flops.estimate(model, inputs, handle.trace)
    for full, cut in zip(est, pruned):
        assert cut.vision == full.vision and cut.llm_prefill < full.llm_prefill


class _Processor:
    """What Qwen2.5-VL's processor does for one image per prompt (the real one needs torchvision)."""

    chat_template = None

    def __init__(self) -> None:
        self.tokenizer = tiny.qwen_tokenizer()

    def __call__(self, images, text, return_tensors="pt", padding=True):
        pieces = [t.split("<image>") for t in text]
        return tiny.qwen_inputs([[pre, ("image", img), post] for img, (pre, post) in zip(images, pieces)])


def test_eval_runner_accepts_qwen():
    from evals import runner
    from evals.tasks import get_task

    model = tiny.qwen2_5_vl()
    task = get_task("shapes")
    docs = list(enumerate(task.docs(4, 0)))
    opts = runner.RunOptions(batch_size=2, max_new_tokens=3, overlays=0)
    base = runner.run_docs(model, _Processor(), task, docs, "none", None, opts)
    pruned = runner.run_docs(model, _Processor(), task, docs, "fastv", 0.5, opts)
    for b, p in zip(base, pruned):
        assert b["unpruned_visual_tokens"] == p["unpruned_visual_tokens"] > 0
        assert p["flops"]["vision"] == b["flops"]["vision"] > 0
        assert p["flops"]["llm_prefill"] < b["flops"]["llm_prefill"]
        assert abs(sum(p["visual_tokens_per_layer"]) / len(p["visual_tokens_per_layer"])
                   / p["unpruned_visual_tokens"] - 0.5) < 0.1


def test_early_exit_fills_skipped_qwen3_layers_exactly():
    """MuE decode exit on Qwen3-VL: a skipped layer's cache gets the exit state's keys through the
    layer's k_norm and RoPE, so every step equals a cache-free run in which the generated tokens
    pass the skipped layers unchanged."""
    model = _model("qwen3_vl")
    inputs = tiny.qwen_inputs(_samples("sizes")[:1])
    n = 8
    with tokenprune.patch(model, "early_exit", threshold=0.93, min_layer=1) as handle:
        tokens, step_logits = tiny.generate_logits(model, inputs, n)
    layers = handle.trace.early_exit.layers_per_token[0]
    # on this tiny model: tokens exit at varied depths, and a later token reads an exited one's fill
    assert any(int(layers[t]) < int(layers[u]) for t in range(n - 1) for u in range(t + 1, n - 1)), layers
    prompt = inputs["input_ids"].shape[1]
    lm_layers = model.model.language_model.layers
    for s in range(1, n):
        run = torch.full((prompt + s,), 8)
        run[prompt:] = layers[:s]

        def freeze(mod, args, out, j, run=run):
            return torch.where((run <= j)[None, :, None], args[0], out)

        hooks = [lay.register_forward_hook(lambda m, a, o, j=j: freeze(m, a, o, j)) for j, lay in enumerate(lm_layers)]
        pad = torch.ones_like(tokens[:, :s])
        extended = {**inputs, "input_ids": torch.cat([inputs["input_ids"], tokens[:, :s]], 1),
                    "attention_mask": torch.cat([inputs["attention_mask"], pad], 1),
                    "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], 0 * pad], 1)}
        try:
            with torch.no_grad():
                logits = model(**extended, use_cache=False).logits[0, -1]
        finally:
            for h in hooks:
                h.remove()
        assert torch.allclose(logits, step_logits[0, s], atol=1e-4), s


def test_image_exit_is_refused_on_packed_towers(family):
    with pytest.raises(tokenprune.errors.MethodArgumentError, match="vision_threshold"):
        tokenprune.patch(_model(family), "early_exit", vision_threshold=0.9)


def test_the_model_core_is_patched_like_the_full_model(family):
    """``Qwen*VLModel`` (no LM head) is found by type too: budget 1.0 is exact, pruning shortens."""
    core = _model(family).model
    inputs = tiny.qwen_batch()
    with torch.no_grad():
        ref = core(**inputs).last_hidden_state
    with tokenprune.patch(core, "uniform", budget=1.0), torch.no_grad():
        assert torch.equal(core(**inputs).last_hidden_state, ref)
    with tokenprune.patch(core, "uniform", budget=0.5) as handle, torch.no_grad():
        out = core(**inputs).last_hidden_state
    assert out.shape[1] < ref.shape[1] and handle.trace.realized_budget == pytest.approx(0.5, abs=0.1)
