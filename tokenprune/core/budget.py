"""One meaning of ``budget`` for every method: the fraction of visual-token compute kept, i.e. the
mean over the budgeted layers (LLM decoder layers of a VLM, encoder layers of a standalone
encoder) of the visual tokens entering a layer, over the unpruned count."""

from __future__ import annotations

from ..adapters.base import Anatomy
from ..errors import BudgetError


def check_budget(budget: float) -> float:
    """Validate ``budget`` in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise BudgetError(f"budget: must be a number in (0, 1] (fraction of visual-token compute kept); got {budget!r}")
    return float(budget)


def stack_depth(anatomy: Anatomy) -> int:
    """Number of layers the budget averages over."""
    return anatomy.llm.num_layers if anatomy.is_vlm else anatomy.vision.num_layers


def keep_ratio_from(budget: float, first_pruned: int, depth: int) -> float:
    """Keep ratio R of a single reduction before layer ``first_pruned`` of a ``depth``-layer stack,
    such that (first_pruned + (depth - first_pruned) * R) / depth == budget."""
    floor = first_pruned / depth
    if budget <= floor:
        raise BudgetError(
            f"budget: {budget} is not reachable when the first {first_pruned} of {depth} layers see every "
            f"token (minimum above {floor:.3f}); raise the budget or act at an earlier layer",
            minimum=floor,
        )
    return min(1.0, (budget * depth - first_pruned) / (depth - first_pruned))


def single_stage_keep(budget: float, anatomy: Anatomy, site: str, layer: int) -> float:
    """Keep ratio for a method that reduces once, at ``site``/``layer``."""
    if site == "pre_llm" or (site == "vision" and anatomy.is_vlm):
        return budget
    return keep_ratio_from(budget, layer, stack_depth(anatomy))


def earliest_layer(budget: float, preferred: int, depth: int) -> int:
    """``preferred`` or the latest earlier layer >= 1 at which ``budget`` is reachable."""
    layer = min(preferred, max(1, int(budget * depth - 1e-9)))
    if layer / depth >= budget:
        raise BudgetError(
            f"budget: {budget} is below what one reduction after layer 0 can reach on a {depth}-layer stack "
            f"(minimum above {1 / depth:.3f})",
            minimum=1 / depth,
        )
    return layer


def require_budget(budget: float | None, method: str, explicit: str) -> float:
    """``budget``, or a clear error when neither it nor the explicit schedule ``explicit`` is set."""
    if budget is None:
        raise BudgetError(f"budget: {method} needs a budget in (0, 1] or explicit {explicit}")
    return budget
