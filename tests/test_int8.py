"""LLM.int8() (bitsandbytes) combined with token reduction: scope, bytes, outlier threshold,
idempotence, remove() semantics, every registered method on our int8 and on transformers'
``load_in_8bit`` models, and the missing-dependency error."""

from __future__ import annotations

import sys

import pytest
import tiny
import torch
from torch import nn

import tokenprune
from tokenprune.errors import MissingDependencyError, QuantizationError, TokenPruneError
from tokenprune.quant import int8_state, is_int8, weight_bytes

METHODS = sorted(tokenprune.methods())


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes")


def linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def hook_count(model: nn.Module) -> int:
    """Forward hooks on the model (transformers adds its own output-capturing hooks on the first
    forward, so compare counts taken after a forward)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------------------------- deps


def test_missing_bitsandbytes_says_what_to_install(monkeypatch):
    model, _ = tiny.llava(layers=4)
    before = {n: type(m) for n, m in model.named_modules()}
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'tokenprune-vlm\[int8\]'") as info:
        tokenprune.patch(model, "fastv", budget=0.5, int8=True)
    assert isinstance(info.value, (ValueError, TypeError)) and isinstance(info.value, ImportError)
    assert isinstance(info.value, TokenPruneError)
    with pytest.raises(MissingDependencyError, match="bitsandbytes"):
        tokenprune.quantize_int8(model)
    # nothing was touched: no patch, no hooks, no layer replaced
    assert "_tokenprune_handle" not in model.__dict__ and hook_count(model) == 0
    assert {n: type(m) for n, m in model.named_modules()} == before
    tokenprune.patch(model, "fastv", budget=0.5).remove()  # int8=False never needs bitsandbytes


def test_int8_flag_and_arguments_are_checked(bnb):
    model, _ = tiny.llava(layers=4)
    with pytest.raises(QuantizationError, match="int8"):
        tokenprune.patch(model, "fastv", budget=0.5, int8="yes")
    bad = (({"threshold": -1.0}, "threshold"), ({"skip": [3]}, "skip"), ({"include_vision": 1}, "include_vision"))
    for kwargs, name in bad:
        with pytest.raises(QuantizationError, match=name):
            tokenprune.quantize_int8(model, **kwargs)
    # a patch that fails its own checks quantises nothing
    with pytest.raises(TokenPruneError):
        tokenprune.patch(model, "fastv", int8=True, bogus=1)
    assert not any(is_int8(m) for m in model.modules()) and hook_count(model) == 0


# -------------------------------------------------------------------------------------------- scope


def test_language_model_only_by_default_and_dtypes_kept(bnb):
    model, proc = tiny.llava(layers=4)
    model.to(torch.bfloat16)
    summary = tokenprune.quantize_int8(model)
    lm_layers = tokenprune.adapters.anatomy_of(model).llm.layers
    in_lm = {id(m) for m in lm_layers.modules()}
    for name, mod in linears(model).items():
        if id(mod) in in_lm:
            assert is_int8(mod), name
            cb, scb = int8_state(mod)
            assert cb.dtype == torch.int8 and scb.dtype == torch.float32 and scb.shape == (mod.out_features,)
        else:  # vision tower, projector, lm_head: untouched, still bf16
            assert type(mod) is nn.Linear and mod.weight.dtype == torch.bfloat16, name
    assert len(summary.converted) == 4 * 7 and summary.skipped == ["lm_head"] and not summary.already
    with torch.no_grad():
        out = model(**_bf16(tiny.single(proc, 0)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()


def _bf16(inputs):
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    return inputs


def test_include_vision_skip_patterns_and_standalone_encoder(bnb):
    model, _ = tiny.llava(layers=4)
    summary = tokenprune.quantize_int8(model, include_vision=True, skip=("lm_head", "mlp.down_proj"))
    for name, mod in linears(model).items():
        assert is_int8(mod) == (not name.endswith(("lm_head", "down_proj"))), name
    assert "lm_head" in summary.skipped and len(summary.skipped) == 1 + 4
    vit = tiny.vit()
    tokenprune.quantize_int8(vit)  # standalone encoder: its encoder layers, whatever include_vision says
    layers = {id(m) for m in tokenprune.adapters.anatomy_of(vit).vision.layers.modules()}
    for name, mod in linears(vit).items():
        assert is_int8(mod) == (id(mod) in layers), name
    assert type(vit.classifier) is nn.Linear
    x = torch.randn(2, 3, 32, 32)
    assert torch.isfinite(vit(pixel_values=x).logits).all()


def test_weight_bytes_at_most_055_of_fp16(bnb):
    model, _ = tiny.llava(layers=4)
    fp16 = {n: m.weight.numel() * 2 for n, m in linears(model).items()}
    summary = tokenprune.quantize_int8(model)
    mods = linears(model)
    int8_bytes = sum(weight_bytes(mods[n]) for n in summary.converted)
    ref = sum(fp16[n] for n in summary.converted)
    # measured from the tensors: int8 codes + float32 row scales (64x64 q_proj: 4096 + 256 bytes)
    assert int8_bytes == sum(mods[n].weight.numel() + 4 * mods[n].out_features for n in summary.converted)
    assert int8_bytes <= 0.55 * ref, int8_bytes / ref


def test_outputs_close_to_fp32(bnb):
    model, proc = tiny.llava(layers=4)
    inputs = tiny.single(proc, 0)
    with torch.no_grad():
        ref = model(**inputs).logits
        tokenprune.quantize_int8(model)
        got = model(**inputs).logits
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999 and not torch.equal(got, ref)  # int8 rounding, nothing else


# ---------------------------------------------------------------------------------------- threshold


def test_threshold_sends_outlier_columns_to_the_fp_path(bnb):
    torch.manual_seed(0)
    models = {}
    for thr in (6.0, 0.0):
        model, _ = tiny.llava(layers=2)
        tokenprune.quantize_int8(model, threshold=thr)
        models[thr] = model
    fp, _ = tiny.llava(layers=2)
    ref_layer = fp.model.language_model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, ref_layer.in_features)
    x[..., 7] *= 80.0  # a large-magnitude input feature, as in LLM.int8's outlier dimensions
    with torch.no_grad():
        ref = ref_layer(x)
        errs = {}
        for thr, model in models.items():
            layer = model.model.language_model.layers[0].mlp.down_proj
            assert layer.state.threshold == thr
            errs[thr] = (layer(x) - ref).abs().max().item()
            if thr > 0:
                assert layer.state.idx.tolist() == [7]  # the planted column took the outlier path
    assert errs[6.0] < errs[0.0] / 4, errs


# ---------------------------------------------------------------------------- idempotence, remove()


def test_quantising_twice_is_a_noop(bnb):
    model, proc = tiny.llava(layers=4)
    first = tokenprune.quantize_int8(model)
    mods = linears(model)
    codes = {n: int8_state(mods[n])[0].clone() for n in first.converted}
    second = tokenprune.quantize_int8(model, threshold=0.0)
    assert second.converted == [] and sorted(second.already) == sorted(first.converted)
    after = linears(model)
    for n in first.converted:
        assert after[n] is mods[n] and after[n].state.threshold == 6.0
        assert torch.equal(int8_state(after[n])[0], codes[n])
    h = tokenprune.patch(model, "fastv", budget=0.5, int8=True)  # also a no-op on the layers
    assert all(linears(model)[n] is mods[n] for n in first.converted)
    h.remove()


def test_remove_takes_the_token_patch_off_and_leaves_int8(bnb):
    model, proc = tiny.llava(layers=4)
    inputs = tiny.single(proc, 0)
    tiny.greedy(model, inputs, n=1)
    hooks = hook_count(model)
    h = tokenprune.patch(model, "fastv", budget=0.5, int8=True)
    assert sum(is_int8(m) for m in model.modules()) == 4 * 7
    tiny.greedy(model, inputs)
    assert h.trace.stages[0].kept.shape[1] < 16
    h.remove()
    assert hook_count(model) == hooks and "_tokenprune_handle" not in model.__dict__
    assert sum(is_int8(m) for m in model.modules()) == 4 * 7
    with torch.no_grad():
        unpatched = model(**inputs).logits
    ref, _ = tiny.llava(layers=4)
    tokenprune.quantize_int8(ref)
    with torch.no_grad():
        assert torch.equal(unpatched, ref(**inputs).logits)  # exactly the int8 model, no pruning left


def test_hooks_on_replaced_linears_survive(bnb):
    model, proc = tiny.llava(layers=2)
    q = model.model.language_model.layers[1].self_attn.q_proj
    calls = []
    handle = q.register_forward_hook(lambda mod, args, out: calls.append(type(mod).__name__))
    tokenprune.quantize_int8(model)
    with torch.no_grad():
        model(**tiny.single(proc, 0))
    assert calls == ["Linear8bitLt"]
    new_q = model.model.language_model.layers[1].self_attn.q_proj
    assert new_q is not q and len(new_q._forward_hooks) == 1
    handle.remove()
    assert len(new_q._forward_hooks) == 0


# ------------------------------------------------------------------------- every method x int8 path


# methods that need more than a budget on a tiny LLaVA
KWARGS = {"cluster": {"clusters": 4}}


def _patch(model, method, **extra):
    params = KWARGS.get(method, {})
    budget = 0.5 if tokenprune.method(method, **params).uses_budget else None  # cluster / early_exit: none
    return tokenprune.patch(model, method, budget=budget, **params, **extra)


def _kept(handle) -> list[tuple[str, int, int]]:
    """(site, layer, kept count) per stage of the last prefill."""
    return [(r.site, r.layer, int((r.kept >= 0).sum(-1).max())) for r in handle.trace.stages]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_our_int8(bnb, method):
    """Both orders: int8 under a live patch (hooks on replaced linears move over) and patch(int8=True)
    on an int8 model; the same token counts as fp32, and remove() leaves int8."""
    model, proc = tiny.llava(layers=4)
    inputs = tiny.single(proc, 0)
    tiny.greedy(model, inputs, n=1)
    hooks = hook_count(model)
    h = _patch(model, method)
    want = tiny.greedy(model, inputs)
    kept = _kept(h)
    tokenprune.quantize_int8(model, include_vision=True)  # while patched
    got = tiny.greedy(model, inputs)
    assert _kept(h) == kept and got.shape == want.shape
    h.remove()
    assert hook_count(model) == hooks and sum(is_int8(m) for m in model.modules()) == len(linears(model)) - 1
    h = _patch(model, method, int8=True)  # layers already int8: nothing converted again
    tiny.greedy(model, inputs)
    assert _kept(h) == kept
    h.remove()
    assert hook_count(model) == hooks


def test_llava_next_batch_on_int8(bnb):
    model, proc = tiny.llava_next(layers=4)
    inputs = tiny.batch(proc)
    with tokenprune.patch(model, "pdrop", budget=0.5) as h:
        want = tiny.greedy(model, inputs)
        kept = _kept(h)
    with tokenprune.patch(model, "pdrop", budget=0.5, int8=True) as h:
        got = tiny.greedy(model, inputs)
        assert _kept(h) == kept and got.shape == want.shape
    assert sum(is_int8(m) for m in model.modules()) == 4 * 7


@pytest.fixture(scope="module")
def hf_int8(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    model, proc = tiny.llava(layers=4)
    path = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(path)
    loaded = LlavaForConditionalGeneration.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    return loaded.eval(), proc, model


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_load_in_8bit(hf_int8, method):
    model, proc, fp32 = hf_int8
    assert sum(is_int8(m) for m in model.modules()) == len(linears(model)) - 1  # all but lm_head
    inputs = tiny.single(proc, 1)
    full = tiny.greedy(model, inputs)
    hooks = hook_count(model)
    with _patch(fp32, method) as h:
        tiny.greedy(fp32, inputs)
        kept = _kept(h)
    with _patch(model, method) as h:
        out = tiny.greedy(model, inputs)
        assert h.trace is not None and _kept(h) == kept
    assert out.shape == full.shape and hook_count(model) == hooks
    assert torch.equal(tiny.greedy(model, inputs), full)


def test_patch_int8_on_load_in_8bit_is_a_noop(hf_int8):
    model, _, _ = hf_int8
    before = {n: m for n, m in model.named_modules()}
    summary = tokenprune.quantize_int8(model, include_vision=True)
    assert summary.converted == [] and len(summary.already) == len(linears(model)) - 1
    with tokenprune.patch(model, "fastv", budget=0.5, int8=True):
        assert {n: m for n, m in model.named_modules()} == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(bnb):
    model, proc = tiny.llava(layers=4)
    model.to("cuda", torch.float16)
    inputs = tiny.single(proc, 0).to("cuda")
    inputs["pixel_values"] = inputs["pixel_values"].half()
    with torch.no_grad():
        ref = model(**inputs).logits.float()
    h = tokenprune.patch(model, "fastv", budget=1.0, int8=True)
    for n in tokenprune.quantize_int8(model).already:
        assert int8_state(model.get_submodule(n))[0].device.type == "cuda"
    with torch.no_grad():
        got = model(**inputs).logits.float()
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.999
    h.remove()


def test_refusal_leaves_the_model_untouched(bnb):
    model, _ = tiny.llava(layers=2)
    with torch.no_grad():
        model.model.language_model.layers[1].mlp.up_proj.weight[0, 0] = 1e6  # beyond float16
    with pytest.raises(QuantizationError, match=r"layers\.1\.mlp\.up_proj.*skip"):
        tokenprune.quantize_int8(model)
    assert not any(is_int8(m) for m in model.modules())
    summary = tokenprune.quantize_int8(model, skip=("lm_head", "up_proj"))
    assert len(summary.converted) == 2 * 6 and type(model.model.language_model.layers[1].mlp.up_proj) is nn.Linear
