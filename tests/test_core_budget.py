"""Invariant 6 and the trace's shape: realised budget within +-2% (or one token) of the request."""

import pytest
import tiny
import torch

import tokenprune
from tokenprune.core.trace import StageRecord, Trace


@pytest.fixture(scope="module")
def deep():
    model, proc = tiny.llava(layers=16, image=64, patch=8)  # 64 visual tokens, 16 decoder layers
    return model, tiny.batch(proc)


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
@pytest.mark.parametrize(
    "method,params",
    [
        ("random", {}),
        ("uniform", {}),
        ("fastv", {}),
        ("random", {"site": "llm"}),
        ("uniform", {"site": "llm", "layer": 1}),
    ],
)
def test_realized_budget_close_to_request(deep, method, params, budget):
    model, inputs = deep
    with tokenprune.patch(model, method, budget=budget, **params) as handle, torch.no_grad():
        model(**inputs)
    trace = handle.trace
    n = float(trace.unpruned.float().mean())
    err = abs(trace.realized_budget - budget)
    assert err <= 0.02 or err * n <= 1.0, (method, params, budget, trace.realized_budget)


def test_trace_shape_and_semantics(deep):
    model, inputs = deep
    with tokenprune.patch(model, "fastv", budget=0.3) as handle, torch.no_grad():
        model(**inputs)
    trace = handle.trace
    (stage,) = trace.stages
    assert (stage.name, stage.site) == ("fastv", "llm") and stage.layer >= 1
    assert stage.kept.dtype == torch.long and stage.kept.shape[0] == 2
    for row in stage.kept:
        row = row[row >= 0]
        assert torch.equal(row, row.sort().values) and int(row.max()) < 64
    per_layer = trace.visual_tokens_per_layer
    assert len(per_layer) == 16
    assert per_layer[: stage.layer] == [64.0] * stage.layer
    assert per_layer[stage.layer :] == [float(stage.counts.float().mean())] * (16 - stage.layer)
    assert trace.realized_budget == pytest.approx(sum(per_layer) / (16 * 64))


def test_trace_pads_rows_that_keep_different_counts():
    model, proc = tiny.llava_next()
    inputs = tiny.batch(proc, sizes=((40, 70), (64, 32)))
    with tokenprune.patch(model, "uniform", budget=0.3) as handle, torch.no_grad():
        model(**inputs)
    kept = handle.trace.stages[0].kept
    counts = (kept >= 0).sum(-1)
    assert counts[0] != counts[1]
    short = int(counts.argmin())
    assert (kept[short, counts[short] :] == -1).all()


def test_encoder_budget_counts_encoder_layers():
    model = tiny.vit()  # 6 layers, 64 patches + CLS
    with tokenprune.patch(model, "random", budget=0.5, layer=2) as handle, torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 5)
    trace = handle.trace
    assert trace.budget_site == "vision" and len(trace.visual_tokens_per_layer) == 6
    assert abs(trace.realized_budget - 0.5) * 64 <= 1.0
    assert trace.stages[0].kept.shape == (2, round(64 * (0.5 * 6 - 2) / 4))


def test_trace_tokens_entering_follows_stage_order():
    trace = Trace(
        torch.tensor([10, 10]),
        4,
        "llm",
        [
            StageRecord("a", "pre_llm", -1, torch.arange(8).expand(2, 8)),
            StageRecord("b", "llm", 2, torch.arange(4).expand(2, 4)),
        ],
    )
    assert trace.visual_tokens_per_layer == [8.0, 8.0, 4.0, 4.0]
    assert trace.realized_budget == pytest.approx(24 / 40)


def test_composed_methods_apply_in_order(deep):
    model, inputs = deep
    both = [tokenprune.method("random", keep=0.5), tokenprune.method("fastv", k=4, r=0.5)]
    with tokenprune.patch(model, both) as handle, torch.no_grad():
        model(**inputs)
    pre, llm = handle.trace.stages
    assert (pre.site, llm.site, llm.layer) == ("pre_llm", "llm", 4)
    assert pre.counts.tolist() == [32, 32] and llm.counts.tolist() == [16, 16]
    for a, b in zip(pre.kept, llm.kept):
        assert set(b.tolist()) <= set(a.tolist())  # the LLM stage chooses among what reached it
    assert handle.method.name == "random+fastv"
    assert handle.trace.visual_tokens_per_layer == [32.0] * 4 + [16.0] * 12


@pytest.mark.parametrize("budget", [0.2, 0.3])
@pytest.mark.parametrize("combo", [["hired", "pdrop"], ["random", "fastv"], ["uniform", "feather"]])
def test_composed_methods_realise_the_budget(deep, combo, budget):
    """A composition's budget has the one meaning: the first method's tokens feed the next, each
    keeps budget ** (1/2) of what reaches it, and the realised budget is the request."""
    model, inputs = deep
    with tokenprune.patch(model, combo, budget=budget) as handle, torch.no_grad():
        model(**inputs)
    trace = handle.trace
    err = abs(trace.realized_budget - budget)
    assert err <= 0.02 or err * 64 <= 1.0, (combo, budget, trace.realized_budget)
    first = trace.stages[0]
    assert first.site == "pre_llm" and first.counts.tolist() == [round(budget**0.5 * 64)] * 2


def test_budget_goes_to_the_token_method_beside_early_exit(deep):
    model, inputs = deep
    with tokenprune.patch(model, "pdrop", budget=0.3) as alone, torch.no_grad():
        model(**inputs)
    both = ["pdrop", tokenprune.method("early_exit", threshold=None)]
    with tokenprune.patch(model, both, budget=0.3) as handle, torch.no_grad():
        model(**inputs)
    assert [(s.name, s.layer) for s in handle.trace.stages] == [(s.name, s.layer) for s in alone.trace.stages]
    for a, b in zip(handle.trace.stages, alone.trace.stages):
        assert torch.equal(a.kept, b.kept)
    assert handle.trace.realized_budget == alone.trace.realized_budget


@pytest.mark.parametrize(
    "method,params,needle",
    [
        ("early_exit", {}, "reduces no tokens"),
        ("fastv", {"k": 2, "r": 0.5}, "explicit parameters"),
        ("pdrop", {"lam": 0.5}, "explicit parameters"),
        ("random", {"keep": 0.5}, "explicit parameters"),
    ],
)
def test_a_budget_a_method_would_ignore_is_refused(deep, method, params, needle):
    model, _ = deep
    with pytest.raises(tokenprune.errors.BudgetError, match=f"^budget: .*{needle}"):
        tokenprune.patch(model, method, budget=1.0, **params)
    assert "_tokenprune_handle" not in model.__dict__


@pytest.mark.parametrize(
    "combo,error,needle",
    [
        (["fastv", "pdrop"], tokenprune.errors.BudgetError, "prune inside the LLM"),
        ([tokenprune.method("random", keep=0.5), "fastv"], tokenprune.errors.BudgetError, "explicit schedules"),
        (["tome", "hired"], tokenprune.errors.SiteError, "full patch grid"),
    ],
)
def test_compositions_that_cannot_be_exact_are_refused(deep, combo, error, needle):
    model, _ = deep
    with pytest.raises(error, match=needle):
        tokenprune.patch(model, combo, budget=0.5)
