"""bench_speed on a tiny geometry: every variant runs, the peer-style FastV keeps our kept set, and
the table's numbers are consistent with each other."""

from __future__ import annotations

import pytest

from evals import bench_speed


def test_bench_speed_small_geometry():
    res = bench_speed.run(layers=8, methods=["random", "fastv", "pdrop", "feather"], budget=0.4, warmup=0, repeats=1,
                          new_tokens=2, profile=False, hidden=64, heads=4, ffn=128, image=56, patch=14,
                          log=lambda *_: None)
    rows = {r["method"]: r for r in res["results"]}
    assert list(rows) == ["none", "random", "fastv", "pdrop", "feather", "fastv[rerun]", "fastv[eager]", "control"]
    base = rows["none"]
    assert base["ideal_speedup"] == 1.0 and base["ideal_speedup_32"] == 1.0 and base["scoring_s"] == 0.0
    for m in ("random", "fastv", "pdrop", "feather", "fastv[rerun]", "fastv[eager]"):
        r = rows[m]
        assert r["realized_budget"] == pytest.approx(0.4, abs=0.07), m
        assert r["ideal_speedup"] > 1.0 and r["ideal_speedup_32"] > 1.0, m
        assert r["measured_speedup"] == pytest.approx(base["prefill_s"] / r["prefill_s"])
        assert r["decode_s"] > 0 and r["decode_ideal_bytes"] >= 1.0, m
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
    md = bench_speed.markdown(res)
    assert "| fastv[rerun] |" in md and "8 of 32 layers" in md
