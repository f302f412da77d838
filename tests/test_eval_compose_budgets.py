"""evals/compose_budgets.py on a small geometry: the table it writes holds the realised budgets."""

from __future__ import annotations

from evals import compose_budgets


def test_compose_budgets_small_geometry():
    res = compose_budgets.measure(image=64, patch=8, layers=16, budgets=(0.1, 0.3),
                                  compositions=(("hired", "pdrop"), ("tome", "pdrop")))  # fmt: skip
    rows = {(tuple(r["methods"]), r["budget"]): r for r in res["rows"]}
    for b in (0.1, 0.3):
        r = rows[(("hired", "pdrop"), b)]
        assert abs(r["realised"] - b) <= 0.02 and r["kept_per_stage"]["hired"] == [round(b**0.5 * 64)] * 2
    assert rows[(("tome", "pdrop"), 0.1)]["refused"].startswith("BudgetError: budget: 0.1 split over")
    table = compose_budgets.markdown(res)
    assert "| hired+pdrop | " in table and "| tome+pdrop | refused | " in table
