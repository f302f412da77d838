"""Invariants 1-2: budget 1.0 reproduces the unpatched model; remove()/unpatch() restore it."""

import pytest
import tiny
import torch

import tokenprune

VLM_METHODS = [
    ("random", {}),
    ("uniform", {}),
    ("fastv", {}),
    ("random", {"site": "llm", "layer": 3}),
    ("uniform", {"site": "llm"}),
]
ENCODER_METHODS = [("random", {}), ("uniform", {}), ("random", {"layer": 3})]


def _vlm(kind: str):
    if kind == "llava":
        model, proc = tiny.llava()
        return model, tiny.batch(proc)
    model, proc = tiny.llava_next()
    return model, tiny.batch(proc, sizes=((40, 70), (64, 32)))  # anyres tiles, different sizes


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_full_budget_is_exact_for_vlms(kind, attn):
    model, inputs = _vlm(kind)
    model.set_attn_implementation(attn)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref_tokens = tiny.greedy(model, inputs)
    for method, params in VLM_METHODS:
        with tokenprune.patch(model, method, budget=1.0, **params) as handle:
            with torch.no_grad():
                logits = model(**inputs).logits
            assert torch.equal(logits, ref_logits), (method, params)
            assert torch.equal(tiny.greedy(model, inputs), ref_tokens), (method, params)
            assert handle.trace.realized_budget == 1.0
    assert torch.equal(tiny.greedy(model, inputs), ref_tokens)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("build", [tiny.vit, tiny.clip_vision, tiny.siglip_vision])
def test_full_budget_is_exact_for_encoders(build, attn):
    model = build()
    model.set_attn_implementation(attn)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(pixel_values=px)
    for method, params in ENCODER_METHODS:
        with tokenprune.patch(model, method, budget=1.0, **params) as handle:
            with torch.no_grad():
                out = model(pixel_values=px)
            for key in ("logits", "last_hidden_state", "pooler_output"):
                if getattr(ref, key, None) is not None:
                    assert torch.equal(getattr(out, key), getattr(ref, key)), (method, key)
            assert handle.trace.realized_budget == 1.0


def _hooks(model):
    return {(name, k) for name, m in model.named_modules() for d in (m._forward_pre_hooks, m._forward_hooks) for k in d}


def test_remove_and_unpatch_restore_exactly():
    model, inputs = _vlm("llava")
    ref = tiny.greedy(model, inputs)
    before = _hooks(model)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    handle = tokenprune.patch(model, "fastv", budget=0.3)
    assert _hooks(model) > before
    tiny.greedy(model, inputs)
    handle.remove()
    assert torch.equal(tiny.greedy(model, inputs), ref)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)
    handle.remove()  # idempotent

    tokenprune.patch(model, "random", budget=0.25)
    tokenprune.unpatch(model)
    assert torch.equal(tiny.greedy(model, inputs), ref)
    tokenprune.unpatch(model)  # nothing patched: no error
    assert _hooks(model) == before
    assert "get_image_features" not in model.model.__dict__


def test_patching_twice_replaces_the_first_patch():
    model, inputs = _vlm("llava")
    first = tokenprune.patch(model, "random", budget=0.25)
    second = tokenprune.patch(model, "uniform", budget=0.5)
    assert not first.active and second.active
    tiny.greedy(model, inputs, 1)
    assert [s.name for s in second.trace.stages] == ["uniform"]
    assert first.trace is None
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum(-1)[0])
    assert second.trace.stages[0].kept.shape[1] == n_visual // 2
    second.remove()
    assert not any(m._forward_pre_hooks for m in model.modules())  # transformers adds no pre-hooks


def test_pruning_changes_the_computation():
    model, inputs = _vlm("llava")
    with torch.no_grad():
        ref = model(**inputs).logits[:, -1]
        for method in ("random", "uniform", "fastv"):
            with tokenprune.patch(model, method, budget=0.4):
                out = model(**inputs).logits[:, -1]
            assert not torch.allclose(out, ref), method
