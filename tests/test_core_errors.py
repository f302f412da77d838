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
        with pytest.raises(ValueError, match="attention_mask: tokenprune needs left padding"), torch.no_grad():
            model(**inputs)


def test_vision_site_in_llava_next_tower_is_refused():
    model, _ = tiny.llava_next()
    with pytest.raises(errors.SiteError, match="vision-site stages are not supported inside LLaVA-NeXT"):
        tokenprune.patch(model, "random", budget=0.5, site="vision")
