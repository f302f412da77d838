"""Invariant 7: every error path raises a typed error (ValueError/TypeError) naming the parameter."""

import pytest
import tiny
import torch
from torch import nn

import tokenprune
from tokenprune import errors


@pytest.fixture(scope="module")
def llava():
    return tiny.llava()[0]


def test_unknown_method(llava):
    with pytest.raises(errors.UnknownMethodError, match=r"method: unknown method 'nope'.*fastv.*random") as e:
        tokenprune.patch(llava, "nope", budget=0.5)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("budget", [0, 0.0, -0.1, 1.5, True, "half", float("nan")])
def test_budget_outside_range(llava, budget):
    with pytest.raises(errors.BudgetError, match=r"budget: must be a number in \(0, 1\]") as e:
        tokenprune.patch(llava, "random", budget=budget)
    assert isinstance(e.value, ValueError)


def test_budget_required_and_unreachable(llava):
    with pytest.raises(errors.BudgetError, match="budget: fastv needs a budget"):
        tokenprune.patch(llava, "fastv")
    with pytest.raises(errors.BudgetError, match="budget: 0.05 is below"):
        tokenprune.patch(llava, "fastv", budget=0.05)  # 8 layers: one reduction after layer 0 floors at 1/8
    with pytest.raises(errors.BudgetError, match="budget: 0.2 is not reachable"):
        tokenprune.patch(llava, "random", budget=0.2, site="llm", layer=4)


def test_unsupported_model():
    with pytest.raises(
        errors.UnsupportedModelError, match=r"model: Linear is not supported; supported models: .*LlavaFor"
    ) as e:
        tokenprune.patch(nn.Linear(2, 2), "random", budget=0.5)
    assert isinstance(e.value, TypeError)


def test_wrong_site_for_model():
    vit = tiny.vit()
    with pytest.raises(
        errors.SiteError, match="method: fastv acts at the llm site, which a vit model does not have"
    ) as e:
        tokenprune.patch(vit, "fastv", budget=0.5)
    assert isinstance(e.value, ValueError)
    with pytest.raises(errors.MethodArgumentError, match=r"site: expected one of \['vision'\], got 'pre_llm'"):
        tokenprune.patch(vit, "random", budget=0.5, site="pre_llm")


def test_layer_out_of_range(llava):
    with pytest.raises(errors.SiteError, match=r"layer: LLM-site stages act before decoder layers 1..7; got \[0\]"):
        tokenprune.patch(llava, "random", keep=0.5, site="llm", layer=0)
    with pytest.raises(errors.SiteError, match=r"layer: vision-site stages act before encoder layers 1..5"):
        tokenprune.patch(tiny.vit(), "random", keep=0.5, layer=9)
    assert not any(m._forward_pre_hooks for m in llava.modules())  # nothing left behind


def test_unknown_method_parameter(llava):
    with pytest.raises(
        errors.MethodArgumentError, match=r"fastv: unknown parameter\(s\) \['ratio'\]; allowed: \['k', 'r'\]"
    ) as e:
        tokenprune.patch(llava, "fastv", budget=0.5, ratio=0.5)
    assert isinstance(e.value, TypeError)


def test_attention_backend_that_cannot_serve_llm_pruning(llava):
    llava.model.language_model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(errors.AttentionBackendError, match="attn_implementation: fastv prunes inside the LLM"):
            tokenprune.patch(llava, "fastv", budget=0.5)
        handle = tokenprune.patch(llava, "random", budget=0.5)  # pre-LLM methods need no masks
        handle.remove()
    finally:
        llava.model.language_model.config._attn_implementation = "sdpa"


def test_right_padding_is_refused():
    model, proc = tiny.llava()
    proc.tokenizer.padding_side = "right"
    try:
        inputs = tiny.batch(proc)
    finally:
        proc.tokenizer.padding_side = "left"
    with tokenprune.patch(model, "random", budget=0.5):
        with pytest.raises(errors.UnsupportedPathError, match="attention_mask: .* needs left padding"), torch.no_grad():
            model(**inputs)


def test_vision_site_in_llava_next_tower_is_refused():
    model, _ = tiny.llava_next()
    with pytest.raises(errors.SiteError, match=r"site: 'vision' is refused .*tiled tower; allowed: \['pre_llm'"):
        tokenprune.patch(model, "random", budget=0.5, site="vision")


@pytest.mark.parametrize("method", ["hired", "visionzip"])
@pytest.mark.parametrize("strategy", ["full", "default"])
def test_cls_methods_on_a_tower_without_cls_run(method, strategy):
    """They failed at the first forward on a SigLIP LLaVA; they now score by received attention."""
    model, proc = tiny.llava_siglip(strategy)
    with tokenprune.patch(model, method, budget=0.5) as handle, torch.no_grad():
        model(**tiny.batch(proc))
    assert handle.trace.realized_budget == pytest.approx(0.5, abs=1 / 16)


@pytest.mark.parametrize(
    "method,params",
    [("tome", {"budget": 0.6}), ("random", {"budget": 0.6, "site": "vision"}), ("cluster", {"clusters": 4})],
)
def test_vision_site_on_a_default_strategy_siglip_llava_is_refused_at_patch(method, params):
    """LLaVA's "default" strategy drops the tower's first output token, a patch on SigLIP: pruning in the
    tower would change which one (it failed at the first forward with a plain ValueError)."""
    model, proc = tiny.llava_siglip("default")
    with pytest.raises(errors.SiteError, match=r"vision_feature_select_strategy='default'.*before or inside the LLM"):
        tokenprune.patch(model, method, **params)
    full, proc_full = tiny.llava_siglip("full")
    with tokenprune.patch(full, method, **params) as h, torch.no_grad():
        full(**tiny.batch(proc_full))
    assert h.trace.unpruned.tolist() == [16, 16]


def test_default_strategy_siglip_layout_skips_the_dropped_patch():
    model, proc = tiny.llava_siglip("default")
    inputs = tiny.batch(proc)
    assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == 15
    (layout,) = tokenprune.adapters.anatomy_of(model).layouts([15], None)
    assert layout.num_tokens == 15 and (layout.row * 4 + layout.col).tolist() == list(range(1, 16))
    with tokenprune.patch(model, "uniform", budget=0.6) as h, torch.no_grad():
        model(**inputs)
    assert h.trace.stages[0].counts.tolist() == [9, 9]


@pytest.mark.parametrize("params", [{"budget": 0.2}, {"budget": 0.2, "rounds": 2}, {"r": 2}])
def test_tome_on_llava_next_says_the_tower_site_is_refused(params):
    """It used to suggest rounds > 1, which then failed with another SiteError."""
    model, _ = tiny.llava_next()
    with pytest.raises(errors.SiteError, match=r"method: tome .*LLaVA-NeXT's tiled tower") as e:
        tokenprune.patch(model, "tome", **params)
    assert "rounds" not in str(e.value)


@pytest.mark.parametrize("kind", ["paligemma", "gemma3"])
def test_a_supported_tower_inside_an_unsupported_vlm_is_refused(kind):
    """The tower alone was accepted, then the VLM crashed inside transformers on the pruned features."""
    model = tiny.unsupported_vlm(kind)
    for target in (model, model.model, model.model.vision_tower):
        with pytest.raises(errors.UnsupportedModelError, match=r"^model: .*supported models: .*LlavaForCond"):
            tokenprune.patch(target, "random", budget=0.5)
    owner = type(model).__name__
    with pytest.raises(errors.UnsupportedModelError, match=f"vision tower of a {owner}.*is not supported"):
        tokenprune.patch(model.model.vision_tower, "random", budget=0.5)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_a_tower_is_patched_through_its_supported_model_or_on_its_own(llava):
    with pytest.raises(errors.UnsupportedModelError, match="tower of a LlavaForConditionalGeneration.*patch the Llava"):
        tokenprune.patch(llava.model.vision_tower, "random", budget=0.5)

    class Wrapper(nn.Module):  # a module around an encoder that is no VLM: the encoder is the user's to prune
        def __init__(self):
            super().__init__()
            self.encoder = tiny.siglip_vision()

    wrapped = Wrapper()
    with tokenprune.patch(wrapped.encoder, "random", budget=0.5) as handle, torch.no_grad():
        wrapped.encoder(pixel_values=torch.randn(1, 3, 32, 32))
    assert 0 < int(handle.trace.stages[0].counts[0]) < 64 and handle.trace.realized_budget < 1
