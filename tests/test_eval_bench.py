"""bench_prefill on a tiny geometry: the table's numbers are consistent and the hook clocks run."""

from __future__ import annotations

import pytest

from evals import bench_prefill
from evals.results import NOISY_SPREAD


def test_bench_prefill_small_geometry(tmp_path):
    res = bench_prefill.run(layers=4, methods=["random", "uniform", "fastv", "nosuch"], budget=0.5, warmup=0,
                            repeats=2, hidden=64, heads=4, ffn=128, image=56, patch=14, log=lambda *_: None)
    rows = {r["method"]: r for r in res["results"]}
    assert set(rows) == {"none", "random", "uniform", "fastv"}  # unregistered methods are left out
    assert res["geometry"]["visual_tokens"] == 16
    base = rows["none"]
    assert base["flops_ratio"] == 1.0 and base["overhead_s"] == 0.0
    for m in ("random", "uniform", "fastv"):
        r = rows[m]
        assert r["realized_budget"] == pytest.approx(0.5, abs=0.07)
        assert r["flops_ratio"] < 1.0 and r["ideal_speedup"] == pytest.approx(1 / r["flops_ratio"])
        assert r["measured_speedup"] == pytest.approx(base["prefill_s"] / r["prefill_s"])
        assert 0 < r["select_s"] <= r["overhead_s"] + 1e-3 < r["prefill_s"]
        times = r["prefill_s_all"]
        assert r["prefill_spread"] == pytest.approx((max(times) - min(times)) / r["prefill_s_median"])
        assert r["noisy"] == (max(r["prefill_spread"], base["prefill_spread"]) > NOISY_SPREAD)
    md = bench_prefill.markdown(res)
    assert "| fastv |" in md and "4 of 32 layers" in md


def test_bench_prefill_defaults_are_the_readmes_setting():
    from pathlib import Path

    p = bench_prefill.parser()
    defaults = vars(p.parse_args([]))
    assert defaults["layers"] == 8 and defaults["threads"] == 1 and defaults["budget"] == 0.2
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "8 of 32 layers" in readme and "budget 0.2" in readme
    assert all(a.help for a in p._actions), "every option has a --help description"
