"""The vLLM plugin's vLLM-free parts (tokenprune/vllm/spec.py, context.py, positions.py), against the
Hugging Face path: the config entry is validated with typed errors, the kept COUNT known before
encoding equals what the HF hooks keep, the context built from raw tower tensors selects exactly the
HF kept sets, and the positions reproduce the HF position ids. Runs without vLLM."""

import pytest
import torch
from transformers import LlavaConfig

import tokenprune
from tokenprune.adapters import anatomy_of
from tokenprune.demo import load, prompt, shapes
from tokenprune.errors import BudgetError, MethodArgumentError, SiteError, UnknownMethodError
from tokenprune.methods import build
from tokenprune.vllm.context import PackedCapture, TowerCapture, dry_run_counts, image_context, select
from tokenprune.vllm.positions import decode_offsets, encode_offsets, prompt_positions
from tokenprune.vllm.spec import build_spec, hf_anatomy, raw_spec

SERVED = ["random", "uniform", "visionzip", "hired", "divprune", "vispruner", "pool"]


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def fixture(request):
    model, proc = load(request.param)
    return model, proc, hf_anatomy(model.config)  # what the plugin builds: the HF model on the meta device


def test_missing_key_means_stock():
    assert raw_spec(LlavaConfig()) is None


@pytest.mark.parametrize(
    "raw, error, match",
    [
        ({"method": "fastv", "budget": 0.25}, SiteError, r"inside the LLM.*servable methods: \[.*visionzip"),
        ({"method": "pdrop", "budget": 0.25}, SiteError, "inside the LLM"),
        ({"method": "feather", "budget": 0.25}, SiteError, "inside the LLM"),
        ({"method": "random", "budget": 0.25, "site": "llm"}, SiteError, "inside the LLM"),
        ({"method": "early_exit"}, SiteError, "hooks of its own"),
        ({"method": "tome", "budget": 0.5}, SiteError, "inside the vision encoder"),
        ({"method": "cdpruner", "budget": 0.25}, SiteError, "instruction text.*without the prompt"),
        ({"method": "dart", "budget": 0.25}, SiteError, "inside the LLM"),
        ({"method": "nope", "budget": 0.25}, UnknownMethodError, "unknown method 'nope'"),
        ({"method": "random", "budget": 1.5}, BudgetError, r"budget: must be a number in \(0, 1\]"),
        ({"method": "random", "budget": 0.25, "sead": 1}, MethodArgumentError, r"unknown parameter\(s\) \['sead'\]"),
        ({"budget": 0.25}, MethodArgumentError, "'method' is required"),
        ({"method": "hired"}, BudgetError, "hired needs a budget"),
    ],
)
def test_bad_entries_raise_typed_errors(fixture, raw, error, match):
    with pytest.raises(error, match=match):
        build_spec(raw, fixture[2])


def test_entry_must_be_a_dict():
    cfg = LlavaConfig()
    cfg.tokenprune = "visionzip"
    with pytest.raises(MethodArgumentError, match="expected a dict"):
        raw_spec(cfg)


def _hf_run(model, proc, method, examples, **params):
    """HF path: kept original indices per example (one image each; LLaVA-NeXT: base crop, tiles, newlines)."""
    inp = proc(images=[e["image"] for e in examples], text=[prompt(e["question"]) for e in examples],
               return_tensors="pt", padding=True)
    with tokenprune.patch(model, method, 0.25, **params) as handle, torch.no_grad():
        model(**inp)
        kept = handle.trace.stages[-1].kept
    return inp, [r[r >= 0] for r in kept]


def _tower_capture(model, anatomy, pixel_values, layers, image_sizes=None):
    """A TowerCapture from the HF tower's own modules (what the vLLM model builds from vLLM's)."""
    vp = anatomy.vision
    inputs, outputs, handles = {}, {}, []
    for layer in layers:
        attn = vp.attention(vp.layers[layer])
        handles.append(attn.register_forward_pre_hook(
            lambda m, a, kw, layer=layer: inputs.__setitem__(layer, kw.get("hidden_states", a[0] if a else None)),
            with_kwargs=True))
        handles.append(vp.layers[layer].register_forward_hook(
            lambda m, a, out, layer=layer: outputs.__setitem__(layer, out[0] if isinstance(out, tuple) else out)))
    extra = {"image_sizes": image_sizes} if image_sizes is not None else {}
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixel_values, return_dict=True, **extra).pooler_output
    for h in handles:
        h.remove()
    attn0 = vp.attention(vp.layers[0])
    n_heads, hd = vp.num_heads(attn0), attn0.head_dim

    def heads(layer):
        attn, h = vp.attention(vp.layers[layer]), inputs[layer]
        t, s, _ = h.shape
        k = attn.k_proj(h).view(t, s, n_heads, hd).transpose(1, 2)
        q = attn.q_proj(h[:, :1]).view(t, 1, n_heads, hd).transpose(1, 2)
        return q, k

    return list(feats), TowerCapture(heads, outputs, n_heads, vp.scale(attn0), vp.has_cls, vp.grid)


@pytest.mark.parametrize("method", SERVED)
def test_context_from_tower_tensors_selects_the_hf_kept_sets(fixture, method):
    model, proc, anatomy = fixture
    examples = shapes("test", 4)
    inp, hf_kept = _hf_run(model, proc, method, examples)
    spec = build_spec({"method": method, "budget": 0.25}, anatomy)
    layers = sorted({c % anatomy.vision.num_layers for c in spec.stage.capture})
    sizes = inp.get("image_sizes")
    feats, capture = _tower_capture(model, anatomy_of(model), inp["pixel_values"], layers, sizes)
    layouts = anatomy.layouts([f.shape[0] for f in feats], {"image_sizes": sizes})
    crops = torch.tensor([0] + [int(lay.tile.max()) + 1 for lay in layouts]).cumsum(0)  # tower rows per image
    rows = [crops[b] + lay.tile.clamp(min=0) for b, lay in enumerate(layouts)]
    with torch.no_grad():
        ctx = image_context(feats, layouts, rows, capture, model.model.multi_modal_projector)
        kept, chosen = select(spec.stage, ctx)
    for b, ref in enumerate(hf_kept):
        assert torch.equal(kept[b][kept[b] >= 0], ref), (method, b)
    assert chosen.shape[:2] == kept.shape
    counts = dry_run_counts(spec.stage, layouts)
    assert counts == [ref.numel() for ref in hf_kept]


def test_served_context_refuses_the_prompt(fixture):
    """A stage that reads the instruction (CDPruner) fails loudly in a served context, never silently
    choosing without it: vLLM encodes an image without its request's text."""
    model, proc, anatomy = fixture
    ex = shapes("test", 1)[0]
    inp = proc(images=[ex["image"]], text=[prompt(ex["question"])], return_tensors="pt")
    n = int((inp["input_ids"] == model.config.image_token_id).sum())
    layouts = anatomy.layouts([n], {"image_sizes": inp.get("image_sizes")})
    stage = build("cdpruner").stages(anatomy, 0.25)[0]
    with pytest.raises(SiteError, match="without the prompt"):
        dry_run_counts(stage, layouts)


def test_offset_channels_round_trip_in_bf16():
    offsets = torch.tensor([[3, 0, 5], [200, 1, 7], [1999, 2, 0], [2879, 3, 127]])
    emb = torch.randn(4, 8).to(torch.bfloat16)
    packed = encode_offsets(emb, offsets)
    assert packed.shape == (4, 8 + 3 * 3)
    back, got = decode_offsets(packed, 3)
    assert torch.equal(back, emb)
    assert torch.equal(got, offsets)
    with pytest.raises(ValueError, match="position offsets"):
        encode_offsets(emb[:1], torch.tensor([[-1]]))


def test_prompt_positions_keep_original_text_positions():
    # text 0..2, image at 3 keeps 2 of 5, text after, a second image at 8 keeps 1 of 4, text after
    pos, delta = prompt_positions(11, [(3, 2, 5), (8, 1, 4)])
    assert pos.shape == (3, 11) and torch.equal(pos[0], pos[2])
    assert pos[0].tolist() == [0, 1, 2, 3, 3, 8, 9, 10, 11, 15, 16]
    assert delta == (5 - 2) + (4 - 1)  # decoding continues from the unpruned length
    # kept image tokens land at start + original index once their offsets are added
    _, offsets = decode_offsets(encode_offsets(torch.zeros(2, 1), torch.tensor([[1], [4]])), 1)
    assert (pos[0, 3:5] + offsets[:, 0]).tolist() == [3 + 1, 3 + 4]


QWEN_SERVED = ["random", "uniform", "visionzip", "hired", "divprune", "pool"]


@pytest.fixture(scope="module")
def qwen():
    model, proc = load("qwen2_5_vl")
    return model, proc, hf_anatomy(model.config)


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"method": "vispruner", "budget": 0.25}, "no CLS token"),
        ({"method": "cdpruner", "budget": 0.25}, "without the prompt"),
        ({"method": "fastv", "budget": 0.25}, "inside the LLM"),
    ],
)
def test_qwen_refusals(qwen, raw, match):
    with pytest.raises(SiteError, match=match):
        build_spec(raw, qwen[2])


@pytest.mark.parametrize("method", QWEN_SERVED)
def test_qwen_counts_and_positions_equal_the_hf_path(qwen, method):
    """Per mixed-size image: the kept count known before encoding (dry run on the merged grid) equals the
    HF path's, and the served positions (text unpruned, placeholders at the image start plus each kept
    token's (t, h, w) offset, decode delta) equal the HF path's original M-RoPE positions of the kept prompt."""
    model, proc, anatomy = qwen
    spec = build_spec({"method": method, "budget": 0.25}, anatomy)
    image_token = model.config.image_token_id
    for ex in shapes("test", 3, aspect="mixed"):
        inp = proc(images=[ex["image"]], text=[prompt(ex["question"], "qwen2_5_vl")], return_tensors="pt")
        with tokenprune.patch(model, method, 0.25) as handle, torch.no_grad():
            model(**inp)
            kept = handle.trace.stages[-1].kept[0]
        kept = kept[kept >= 0]
        grid = inp["image_grid_thw"]
        layouts = anatomy.layouts([int((inp["input_ids"] == image_token).sum())], {"image_grid_thw": grid})
        assert dry_run_counts(spec.stage, layouts) == [kept.numel()]
        ids = inp["input_ids"][0]
        full_pos, deltas = model.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"], grid)
        image_cols = (ids == image_token).nonzero().flatten()
        keep_cols = torch.cat([(ids != image_token).nonzero().flatten(), image_cols[kept]]).sort().values
        expected = full_pos[:, 0, keep_cols]
        offset = int(image_cols[0])
        t, h, w = (int(v) for v in grid[0])
        pos, delta = prompt_positions(keep_cols.numel(), [(offset, kept.numel(), max(t, h // 2, w // 2))])
        lay = layouts[0]
        frame = lay.frame if lay.frame is not None else torch.zeros_like(lay.row)
        pos[:, offset : offset + kept.numel()] += torch.stack([frame[kept], lay.row[kept], lay.col[kept]])
        assert torch.equal(pos, expected)
        # decoding: the HF path continues from the unpruned prompt's next position
        assert keep_cols.numel() + delta == ids.numel() + int(deltas[0])


@pytest.mark.parametrize("method", ["visionzip", "hired"])
def test_qwen_packed_context_selects_the_hf_kept_sets(qwen, method):
    """A PackedCapture fed with the packed tower's per-image scores (here the HF adapter's, from the
    blocks' own attention inputs; in vLLM the same math on vLLM's modules) and the per-image features
    selects exactly the HF kept sets, several mixed-size images in one encoder call."""
    model, proc, anatomy = qwen
    examples = shapes("test", 3, aspect="mixed")
    inp = proc(images=[e["image"] for e in examples], text=[prompt(e["question"], "qwen2_5_vl") for e in examples],
               return_tensors="pt", padding=True)
    with tokenprune.patch(model, method, 0.25) as handle, torch.no_grad():
        model(**inp)
        hf_kept = [r[r >= 0] for r in handle.trace.stages[-1].kept]
    spec = build_spec({"method": method, "budget": 0.25}, anatomy)
    vp, blocks = anatomy_of(model).vision, model.model.visual.blocks
    capture, handles = {"inputs": {"image_grid_thw": inp["image_grid_thw"]}}, []

    def keep(layer):
        def hook(mod, args, kwargs, out):  # what the HF engine keeps: the attention call's inputs
            capture[("kwargs", layer)] = {"hidden_states": args[0], **kwargs} if args else kwargs

        return hook

    for layer in sorted(set(spec.stage.capture)):
        handles.append(blocks[layer].attn.register_forward_hook(keep(layer), with_kwargs=True))
    with torch.no_grad():
        feats = model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"], return_dict=True)
    for h in handles:
        h.remove()
    feats = list(feats.pooler_output)
    layouts = anatomy.layouts([f.shape[0] for f in feats], {"image_grid_thw": inp["image_grid_thw"]})
    with torch.no_grad():
        ctx = image_context(feats, layouts, [torch.zeros(f.shape[0], dtype=torch.long) for f in feats],
                            PackedCapture(vp.scorers(capture)), None)
        kept, _ = select(spec.stage, ctx)
    for b, ref in enumerate(hf_kept):
        assert torch.equal(kept[b][kept[b] >= 0], ref), (method, b)
