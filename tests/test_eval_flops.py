"""Analytic FLOPs (tokenprune.flops) against torch's FlopCounterMode on tiny models, unpruned and pruned."""

from __future__ import annotations

import pytest
import tiny
import torch

import tokenprune
from tokenprune import flops

TOL = 0.03


def _counted_prefill(model, inputs) -> tuple[float, object]:
    with flops.flop_counter() as fc, torch.no_grad():
        out = model(**inputs, logits_to_keep=1, use_cache=True)
    return float(fc.get_total_flops()), out


def test_cpu_sdpa_is_counted():
    q = torch.randn(1, 4, 10, 16)
    with flops.flop_counter() as fc:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert fc.get_total_flops() == 2 * 4 * 10 * 10 * (16 + 16)


def test_layer_formula_known_values():
    geo = flops.DecoderGeometry(hidden=4096, ffn=11008, heads=32, kv_heads=32, head_dim=128, layers=32)
    n = 641
    paper = 4 * n * 4096**2 + 2 * n * n * 4096 + 3 * n * 4096 * 11008
    assert flops.layer_macs(geo, n) == paper  # MHA: exact == FastV/PDrop 4nd^2 + 2n^2d + 3ndm
    assert flops.prefill_macs(geo, [n] * 32) / 1e12 == pytest.approx(4.26, abs=0.01)  # evals.md anchor
    gqa = flops.DecoderGeometry(hidden=64, ffn=128, heads=4, kv_heads=2, head_dim=16, layers=1)
    assert flops.layer_macs(gqa, 10) == 10 * 64 * (64 + 2 * 32) + 10 * 64 * 64 + 2 * 100 * 64 + 3 * 10 * 64 * 128
    assert flops.layer_macs(gqa, 10, convention="paper") == 4 * 10 * 64 * 64 + 2 * 100 * 64 + 3 * 10 * 64 * 128


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
@pytest.mark.parametrize("method", [None, "fastv", "random", "pdrop", "feather"])
def test_prefill_matches_flop_counter(kind, method):
    """Exact for selection-only methods; attention-scoring methods add their scoring GEMMs (<= ~2% here)."""
    if method is not None and method not in tokenprune.methods():
        pytest.skip(f"{method} is not registered")
    model, proc = getattr(tiny, kind)()
    inputs = tiny.single(proc, 0)
    handle = tokenprune.patch(model, method, budget=0.5) if method else None
    try:
        counted, _ = _counted_prefill(model, inputs)
        est = flops.estimate(model, inputs, handle.trace if handle else None)[0]
    finally:
        if handle:
            handle.remove()
    analytic = 2 * est.prefill_total
    assert abs(counted / analytic - 1) < TOL, (counted, analytic)
    if method in (None, "random"):
        assert counted == analytic  # no scoring compute: the count is exact
    if method:
        assert handle.trace is not None
        assert min(est.llm_tokens_per_layer) < max(est.llm_tokens_per_layer) or method == "random"


@pytest.mark.parametrize("method", [None, "fastv"])
def test_decode_step_matches_flop_counter(method):
    model, proc = tiny.llava()
    inputs = tiny.single(proc, 0)
    handle = tokenprune.patch(model, method, budget=0.5) if method else None
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], -1)
            est = flops.estimate(model, inputs, handle.trace if handle else None, new_tokens=1)[0]
            with flops.flop_counter() as fc:
                model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    finally:
        if handle:
            handle.remove()
    assert abs(fc.get_total_flops() / (2 * est.decode_per_token) - 1) < TOL


def test_pruned_flops_drop_with_budget():
    model, proc = tiny.llava()
    inputs = tiny.single(proc, 0)
    full = flops.estimate(model, inputs)[0]
    with tokenprune.patch(model, "random", budget=0.25) as h:
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)
        pruned = flops.estimate(model, inputs, h.trace)[0]
    assert pruned.llm_prefill < full.llm_prefill
    assert pruned.vision == full.vision  # pre-LLM pruning does not change the encoder
    assert pruned.as_dict()["prefill_total"] == pytest.approx(pruned.prefill_total)
