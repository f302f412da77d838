"""bench_speed on tiny geometries: every variant runs, the peer-style FastV keeps our kept set, the
table's numbers are consistent with each other, and the shared-weight model is the full-depth model
(its own module, cache slot and schedule per layer) holding one layer's weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tokenprune
from evals import bench_speed
from evals.results import NOISY_SPREAD

TINY = dict(hidden=64, heads=4, ffn=128)


def test_bench_speed_small_geometry():
    res = bench_speed.run("llava", layers=8, methods=["random", "fastv", "pdrop", "feather", "nosuch"], budget=0.4,
                          warmup=0, repeats=2, new_tokens=2, profile=False, image=56, kv_heads=4, log=lambda *_: None,
                          **TINY)
    rows = {r["method"]: r for r in res["results"]}  # unregistered methods are left out
    assert list(rows) == ["none", "random", "fastv", "pdrop", "feather", "fastv[rerun]", "fastv[eager]", "control"]
    base = rows["none"]
    assert base["ideal_speedup"] == 1.0 and base["ideal_speedup_full"] == 1.0 and base["scoring_s"] == 0.0
    for m in ("random", "fastv", "pdrop", "feather", "fastv[rerun]", "fastv[eager]"):
        r = rows[m]
        assert r["realized_budget"] == pytest.approx(0.4, abs=0.07), m
        assert r["ideal_speedup"] > 1.0 and r["ideal_speedup_full"] > 1.0, m
        assert len(r["tokens_per_layer_full"]) == 32, m  # schedules from the 32-layer stand-in
        assert r["measured_speedup"] == pytest.approx(base["prefill_s"] / r["prefill_s"])
        assert r["decode_s"] > 0 and r["decode_ideal_bytes"] >= 1.0, m
        times = r["prefill_s_all"]
        assert r["prefill_spread"] == pytest.approx((max(times) - min(times)) / r["prefill_s_median"])
        assert r["noisy"] == (max(r["prefill_spread"], base["prefill_spread"]) > NOISY_SPREAD)
    assert rows["control"]["llm_tokens_per_layer"] == [float(res["geometry"]["control_tokens"])] * 8
    for p in ("fastv[rerun]", "fastv[eager]"):  # kept sets equal ours (the run raises otherwise)
        assert rows[p]["kept_equal_to_fastv"]
        assert rows[p]["llm_tokens_per_layer"] == rows["fastv"]["llm_tokens_per_layer"]
    assert rows["fastv[rerun]"]["rerun_s"] > 0 and rows["fastv[rerun]"]["scoring_s"] > rows["fastv[rerun]"]["rerun_s"]
    eager = rows["fastv[eager]"]["eager_attention"]  # its layer's attention, eager with weights vs sdpa
    assert eager["eager_s"] > 0 and eager["sdpa_s"] > 0
    assert rows["fastv[eager]"]["scoring_s"] == pytest.approx(rows["fastv[eager]"]["select_s"] + eager["extra_s"])
    # PyramidDrop's scoring needs the keys of the tokens it drops; FastV's only the last query's logits
    assert rows["pdrop"]["scoring_macs_pct"] > rows["fastv"]["scoring_macs_pct"] > 0
    # its net scoring time subtracts its stage layers' own key projection of the kept rows, which it reuses
    kp = rows["pdrop"]["key_projection"]
    stages = [j for j, n in enumerate(rows["pdrop"]["llm_tokens_per_layer"][1:], 1)
              if n < rows["pdrop"]["llm_tokens_per_layer"][j - 1]]
    assert kp["layers"] == stages and len(stages) == 3
    n_text = res["geometry"]["prompt_tokens"] - res["geometry"]["visual_tokens"]
    tokens = rows["pdrop"]["llm_tokens_per_layer"]
    assert kp["rows_all"] == [tokens[j - 1] for j in stages] and kp["rows_kept"] == [tokens[j] for j in stages]
    assert all(k > n_text for k in kp["rows_kept"])
    assert 0 < kp["saved_s"] < kp["all_s_in_run"] < rows["pdrop"]["scoring_s"]  # projecting is part of scoring
    assert rows["pdrop"]["scoring_net_s"] == pytest.approx(rows["pdrop"]["scoring_s"] - kp["saved_s"])
    assert rows["fastv"]["scoring_net_s"] == rows["fastv"]["scoring_s"]  # nothing of FastV's is reused
    md = bench_speed.markdown(res)
    assert "| fastv[rerun] |" in md and "8 of 32 layers" in md and "shared" not in md


def test_shared_weights_model_is_the_full_depth_model():
    spec = dataclasses.replace(bench_speed.SPECS["llava"], image=56, kv_heads=4, **TINY)
    shared = bench_speed.build_model(spec, shared=True)
    layers = shared.model.language_model.layers
    assert len(layers) == 32 and len({id(m) for m in layers}) == 32
    assert [m.self_attn.layer_idx for m in layers] == list(range(32))
    weights = {m.mlp.down_proj.weight.data_ptr() for m in layers}
    assert weights == {layers[0].mlp.down_proj.weight.data_ptr()}
    assert sum(p.numel() for p in layers.parameters()) == sum(p.numel() for p in layers[0].parameters())
    # the same forward as a model whose 32 layers hold distinct copies of those weights
    distinct = bench_speed.build_model(spec, layers=32)
    distinct.load_state_dict(shared.state_dict())  # lists layer 0's tensors under every layer's names
    assert len({m.mlp.down_proj.weight.data_ptr() for m in distinct.model.language_model.layers}) == 32
    inputs = bench_speed.make_inputs(shared, spec)
    with torch.no_grad():
        a, b = shared(**inputs, use_cache=True), distinct(**inputs)
        torch.testing.assert_close(a.logits, b.logits)
        assert len(a.past_key_values.layers) == 32
        # pruning schedules are the 32-layer ones: PyramidDrop's stages at 8 / 16 / 24, FastV's at K = 2
        for method, want in (("pdrop", [8, 16, 24]), ("fastv", [2])):
            with tokenprune.patch(shared, method, budget=0.4) as h:
                shared(**inputs, logits_to_keep=1)
            assert [st.layer for st in h.trace.stages] == want, method


def test_bench_speed_qwen2_5_vl_geometry():
    res = bench_speed.run("qwen2_5_vl", methods=["fastv", "pdrop"], budget=0.4, warmup=0, repeats=1, new_tokens=2,
                          peers=False, control=False, profile=False, shared=True, image=112, kv_heads=2,
                          log=lambda *_: None, **TINY)
    rows = {r["method"]: r for r in res["results"]}
    assert list(rows) == ["none", "fastv", "pdrop"]
    g = res["geometry"]
    assert g["layers"] == g["layers_full"] == 28 and g["visual_tokens"] == 16 and g["shared_weights"]
    assert res["method_params"] == {"pdrop": {"positions": "keep"}}  # no renumbering of 3-D M-RoPE ids
    for m in ("fastv", "pdrop"):
        assert rows[m]["realized_budget"] == pytest.approx(0.4, abs=0.07), m
        assert rows[m]["ideal_speedup_full"] > 1.0  # this run's own 28-layer schedule (decoder MACs only)
        assert rows[m]["tokens_per_layer_full"] == rows[m]["llm_tokens_per_layer"]
    assert rows["pdrop"]["key_projection"]["layers"] == [7, 14, 21]
    assert "28 of 28 layers" in bench_speed.markdown(res)


def test_bench_speed_options_are_described():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        bench_speed.main(["--help"])
    for option in ("--model", "--shared-weights", "--layers", "--image", "--threads", "--out"):
        assert option in out.getvalue()
