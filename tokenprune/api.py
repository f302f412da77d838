"""``tokenprune.patch()`` / ``unpatch()`` and the handle they return."""

from __future__ import annotations

from torch import nn

from .adapters import Anatomy, anatomy_of
from .core.budget import check_budget
from .core.engine import Engine
from .core.stage import Stage
from .core.trace import Trace
from .errors import AttentionBackendError, BudgetError, SiteError
from .methods import REGISTRY, Method, build
from .methods.base import check_sites
from .quant import check_int8_flag, quantize_int8

_ATTR = "_tokenprune_handle"
SCORING_BACKENDS = ("eager", "sdpa")


class PatchHandle:
    """A live patch on a model. ``trace`` is the record of the last prefill; ``remove()`` (or
    leaving a ``with`` block) takes every hook off and restores the model exactly, except that
    int8 layers from ``patch(..., int8=True)`` stay (quantisation is not a hook)."""

    def __init__(self, model: nn.Module, method: Method, budget: float | None, engine: Engine) -> None:
        self.model = model
        self.method = method
        self.budget = budget
        self._engine = engine
        self._final_trace: Trace | None = None

    @property
    def trace(self) -> Trace | None:
        """What the last prefill kept (None before the first forward); still readable after
        ``remove()``."""
        return self._engine.state.trace if self._engine is not None else self._final_trace

    @property
    def active(self) -> bool:
        return self._engine is not None

    def remove(self) -> None:
        """Remove the patch; safe to call twice."""
        if self._engine is not None:
            self._final_trace = self._engine.state.trace
            self._engine.remove()
            self._engine = None
        if self.model.__dict__.get(_ATTR) is self:
            del self.model.__dict__[_ATTR]

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PatchHandle(method={self.method.name!r}, budget={self.budget}, {state})"


def patch(
    model: nn.Module,
    method: str | Method | list = "fastv",
    budget: float | None = None,
    *,
    int8: bool = False,
    **params,
) -> PatchHandle:
    """Inject a token-reduction method into ``model`` with hooks (no class swap, no copied code).

    Args:
        model: a supported Hugging Face model (see ``tokenprune.adapters.SUPPORTED``).
        method: a registered method name (``tokenprune.methods()``), a method instance, or a list
            of them to compose (e.g. ``["pdrop", "early_exit"]``; parameters then go into
            instances made with ``tokenprune.method(name, **params)``).
        budget: fraction of visual-token compute kept, in (0, 1]: the mean over LLM decoder layers
            (encoder layers for a standalone encoder) of the visual tokens entering a layer over
            the unpruned count. Optional when the method's explicit parameters fix its schedule.
        int8: also replace the language model's linears with LLM.int8() layers (bitsandbytes,
            ``tokenprune.quantize_int8(model)`` with its defaults; call that first for other
            settings). Stays in place after ``handle.remove()``; a no-op on layers already int8.
        **params: the method's own parameters (e.g. ``k=2, r=0.5`` for FastV).

    Patching a model that already has a patch replaces it. Returns a :class:`PatchHandle`.
    """
    check_int8_flag(int8)  # before touching the model: bitsandbytes must be importable
    budget = check_budget(budget) if budget is not None else None
    m = build(method, **params)
    anatomy = anatomy_of(model)
    stages = plan(m, anatomy, budget)
    unpatch(model)
    engine = Engine(anatomy, stages, m.install)
    if int8:  # after every check passed; hooks on replaced linears move to the int8 layers
        try:
            quantize_int8(model)
        except Exception:
            engine.remove()
            raise
    handle = PatchHandle(model, m, budget, engine)
    model.__dict__[_ATTR] = handle
    return handle


def plan(m: Method, anatomy: Anatomy, budget: float | None) -> list[Stage]:
    """The stages ``m`` installs on ``anatomy`` at ``budget``, after every check ``patch()`` makes
    before touching the model (typed errors naming the parameter)."""
    if budget is not None:
        budget = check_budget(budget)
        if not m.uses_budget:
            why = (
                "it reduces no tokens (threshold= / vision_threshold= set it); pass budget=None, or compose it with "
                "a token method, e.g. ['pdrop', 'early_exit'], and the budget goes to that method"
                if not m.reduces_tokens
                else "its explicit parameters fix its schedule; pass either those parameters or a budget"
            )
            raise BudgetError(f"budget: {m.name} would ignore budget={budget}: {why}")
    check_sites(m, anatomy)
    stages = m.stages(anatomy, budget)
    first_merge = min((st.layer for st in stages if st.site == "vision"), default=None)
    late = [st.name for st in stages if st.site == "pre_llm" and first_merge is not None
            and any(c % anatomy.vision.num_layers >= first_merge for c in st.capture)]
    if late:
        raise SiteError(
            f"method: {late[0]} reads the vision tower's full patch grid at a layer that the vision-site stages "
            f"(from encoder layer {first_merge} on) have already reduced; compose it with methods that act in the "
            "LLM instead"
        )
    for site in {st.site for st in stages} & {"llm"}:
        impl = anatomy.attn_implementation(site)
        if impl not in SCORING_BACKENDS:
            raise AttentionBackendError(
                f"attn_implementation: {m.name} prunes inside the LLM, which needs per-layer masks; "
                f"the model uses {impl!r}; supported: {list(SCORING_BACKENDS)} "
                "(model.set_attn_implementation('sdpa'))"
            )
    return stages


def unpatch(model: nn.Module) -> None:
    """Remove the patch on ``model`` if there is one (no error otherwise)."""
    handle = model.__dict__.get(_ATTR)
    if handle is not None:
        handle.remove()


def method(name: str, **params) -> Method:
    """A method instance by registered name, e.g. ``tokenprune.method("fastv", k=3, r=0.75)``."""
    return build(name, **params)


def methods() -> dict[str, str]:
    """Registered method names and their one-line descriptions."""
    return {name: cls.summary for name, cls in sorted(REGISTRY.items())}
