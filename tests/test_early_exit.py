"""Early exit (MuE decoding / vision tower, LGViT heads): exactness when it never fires, KV-cache
decoding equal to a cache-free reference with the same exit decisions, per-sample batches, the
skipped unused CLIP layer, encoder exits equal to a truncated encoder, ViT exit heads."""

import pytest
import tiny
import torch
import torch.nn.functional as F

import tokenprune
from tokenprune.early_exit_heads import ExitHeads, train_heads
from tokenprune.errors import MethodArgumentError

THR, MIN_LAYER = 0.89, 1  # on the tiny random LLaVA this exits at varied layers (and sometimes not)


def _gen(model, inputs, n):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def _no_leftovers(model):
    for m in model.modules():
        assert "forward" not in m.__dict__
    assert "get_image_features" not in getattr(model, "model", model).__dict__


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_never_firing_is_exact_and_remove_restores(kind):
    if kind == "llava":
        model, proc = tiny.llava()
        inputs = tiny.batch(proc)
    else:
        model, proc = tiny.llava_next()
        inputs = tiny.batch(proc, sizes=((40, 70), (64, 32)))
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref = _gen(model, inputs, 4)
    with tokenprune.patch(model, "early_exit", threshold=1.5, min_layer=0, vision_threshold=1.5,
                          vision_min_layer=0) as handle:
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, ref_logits)
        assert torch.equal(_gen(model, inputs, 4), ref)
        rec = handle.trace.early_exit
        assert rec.layers_per_token.shape == (2, 3) and bool((rec.layers_per_token == 8).all())
        assert rec.vision.tolist() == [2] * rec.vision.numel()  # layer 3 of 3 is never read (-2)
    _no_leftovers(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)


def test_unused_vision_layer_is_not_computed():
    model, proc = tiny.llava()
    inputs = tiny.single(proc, 0)
    calls = []
    last = tokenprune.adapters.anatomy_of(model).vision.layers[-1]
    last.mlp.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_top = model(**inputs, vision_feature_layer=-1).logits
    n_ref = len(calls)
    with tokenprune.patch(model, "early_exit", threshold=None):
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, ref)
            assert len(calls) == n_ref
            # a caller asking for the last layer gets it computed
            assert torch.equal(model(**inputs, vision_feature_layer=-1).logits, ref_top)
            assert len(calls) == n_ref + 1


def _cache_free_tokens(model, inputs, gen, layers, n_layers):
    """Greedy tokens recomputed without a cache: position t of the generated text runs
    ``layers[t]`` decoder layers (later ones pass it through unchanged, their K/V computed from
    it); also the exit decision each step's last position would take (MuE criterion)."""
    prompt_len = inputs["input_ids"].shape[1]
    lm_layers = model.model.language_model.layers
    tokens, decisions = [], []
    for s in range(1, gen.shape[0]):
        ids = torch.cat([inputs["input_ids"][0], gen[:s]])[None]
        run = torch.full((ids.shape[1],), n_layers)
        run[prompt_len:] = layers[:s]
        sims = {}

        def hook(mod, args, out, j, sims=sims, run=run):
            hs = args[0]
            sims[j] = float(F.cosine_similarity(hs[0, -1].float(), out[0, -1].float(), dim=0))
            frozen = (run <= j)[None, :, None]
            return torch.where(frozen, hs, out)

        handles = [lay.register_forward_hook(lambda m, a, o, j=j: hook(m, a, o, j)) for j, lay in enumerate(lm_layers)]
        try:
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        tokens.append(int(logits[0, -1].argmax()))
        hit = [j for j in range(MIN_LAYER, n_layers - 1) if sims[j] >= THR]
        margin = min(abs(sims[j] - THR) for j in range(MIN_LAYER, n_layers - 1))
        decisions.append((hit[0] + 1 if hit else n_layers, margin))
    return tokens, decisions


def test_decode_with_exit_equals_cache_free_reference():
    model, proc = tiny.llava()
    inputs = tiny.single(proc, 0)
    n = 6
    with tokenprune.patch(model, "early_exit", threshold=THR, min_layer=MIN_LAYER) as handle:
        out = _gen(model, inputs, n)
    gen = out[0, inputs["input_ids"].shape[1]:]
    layers = handle.trace.early_exit.layers_per_token[0]
    assert layers.shape == (n - 1,)
    assert bool((layers < 8).any()), "the threshold should make some tokens exit"
    assert bool((layers >= MIN_LAYER + 1).all())
    ref_tokens, decisions = _cache_free_tokens(model, inputs, gen, layers, 8)
    assert gen[1:].tolist() == ref_tokens
    for got, (want, margin) in zip(layers.tolist(), decisions):
        if margin > 1e-4:
            assert got == want


def test_batch_exits_per_sample():
    model, proc = tiny.llava()
    with tokenprune.patch(model, "early_exit", threshold=THR, min_layer=MIN_LAYER) as handle:
        both = _gen(model, tiny.batch(proc), 5)
        layers_both = handle.trace.early_exit.layers_per_token
        for i in range(2):
            one = tiny.single(proc, i)
            alone = _gen(model, one, 5)
            assert both[i, -5:].tolist() == alone[0, -5:].tolist()
            assert layers_both[i].tolist() == handle.trace.early_exit.layers_per_token[0].tolist()


def test_compose_with_a_token_method():
    model, proc = tiny.llava()
    inputs = tiny.batch(proc)
    fastv = tokenprune.method("fastv", k=2, r=0.5)
    with tokenprune.patch(model, fastv):
        ref = _gen(model, inputs, 4)
    with tokenprune.patch(model, [fastv, tokenprune.method("early_exit", threshold=None)]) as handle:
        assert torch.equal(_gen(model, inputs, 4), ref)
    assert handle.trace.stage("fastv").counts.tolist() == [8, 8]
    with tokenprune.patch(model, [fastv, tokenprune.method("early_exit", threshold=THR, min_layer=3)]) as handle:
        _gen(model, inputs, 4)
    assert handle.trace.early_exit.layers_per_token.shape == (2, 3)
    assert handle.method.name == "fastv+early_exit"


def test_encoder_similarity_exit_equals_truncated_encoder():
    model = tiny.clip_vision()
    torch.manual_seed(0)
    px = torch.randn(6, 3, 32, 32) * torch.linspace(0.2, 3.0, 6)[:, None, None, None]
    with torch.no_grad():
        ref = model(pixel_values=px, output_hidden_states=True)
    hs = ref.hidden_states  # hs[i] = state after i layers
    n = len(hs) - 1
    sims = torch.stack([F.cosine_similarity(hs[i].flatten(1), hs[i + 1].flatten(1), dim=-1) for i in range(n)], 1)
    thr = float(sims[:, 1].median())
    first = 1
    want = []
    for b in range(px.shape[0]):
        hit = [i for i in range(first, n - 1) if sims[b, i] >= thr]
        want.append(hit[0] + 1 if hit else n)
    assert len(set(want)) > 1
    with tokenprune.patch(model, "early_exit", vision_threshold=thr, vision_min_layer=first) as handle:
        with torch.no_grad():
            out = model(pixel_values=px).last_hidden_state
    assert handle.trace.early_exit.vision.tolist() == want
    for b, e in enumerate(want):
        torch.testing.assert_close(out[b], hs[e][b], atol=1e-5, rtol=1e-5)


def test_vit_exit_heads():
    model = tiny.vit()
    torch.manual_seed(0)
    px = torch.randn(8, 3, 32, 32)
    heads = train_heads(model, ((px, torch.arange(8) % 5) for _ in range(5)), steps=5, lr=1e-2, log_every=0)
    assert heads.positions == [1, 2, 3, 4]
    with torch.no_grad():
        ref = model(pixel_values=px, output_hidden_states=True)
        head_logits = {p: h(ref.hidden_states[p + 1])[0] for p, h in zip(heads.positions, heads.heads)}
    with tokenprune.patch(model, "early_exit", heads=heads, threshold=1.5) as handle:
        with torch.no_grad():
            assert torch.equal(model(pixel_values=px).logits, ref.logits)
        assert handle.trace.early_exit.classify.tolist() == [6] * 8
    conf = head_logits[1].softmax(-1).amax(-1)
    thr = float(conf.median())
    with tokenprune.patch(model, "early_exit", heads=heads, threshold=thr) as handle:
        with torch.no_grad():
            out = model(pixel_values=px).logits
    used = handle.trace.early_exit.classify
    for b in range(8):
        e = int(used[b])
        want = ref.logits[b] if e == 6 else head_logits[e - 1][b]
        torch.testing.assert_close(out[b], want, atol=1e-5, rtol=1e-5)
        if conf[b] >= thr:
            assert e == 2
    assert len(set(used.tolist())) > 1
    path = "/tmp/tokenprune_test_heads.safetensors"
    heads.save(path)
    with tokenprune.patch(model, "early_exit", heads=path, threshold=thr) as handle:
        with torch.no_grad():
            torch.testing.assert_close(model(pixel_values=px).logits, out)
    assert isinstance(ExitHeads.load(path), ExitHeads)
    _no_leftovers(model)


def test_errors():
    model, _ = tiny.llava()
    vit = tiny.vit()
    with pytest.raises(MethodArgumentError):
        tokenprune.patch(vit, "early_exit")  # no heads, no vision threshold
    with pytest.raises(MethodArgumentError):
        tokenprune.patch(model, "early_exit", heads=ExitHeads.for_model(vit))
    with pytest.raises(MethodArgumentError):
        tokenprune.patch(model, "early_exit", min_layer=8)
    with pytest.raises(MethodArgumentError):
        tokenprune.patch(model, "early_exit", threshold="high")
    assert "forward" not in model.model.language_model.layers[4].__dict__
