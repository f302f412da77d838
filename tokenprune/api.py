"""``tokenprune.patch()`` / ``unpatch()`` and the handle they return."""

from __future__ import annotations

import copy
import functools
import weakref

import torch
from torch import nn

from .adapters import Anatomy, anatomy_of
from .core.budget import check_budget
from .core.engine import Engine
from .core.labels import kept_columns
from .core.stage import Stage
from .core.trace import Trace
from .errors import AttentionBackendError, BudgetError, PatchedModelError, SiteError
from .methods import REGISTRY, Method, build
from .methods.base import check_sites
from .quant import check_int8_flag, quantize_int8

_ATTR = "_tokenprune_handle"
_LIVE: weakref.WeakSet = weakref.WeakSet()  # active handles, to refuse nested patches
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
        """What the calling thread's last prefill kept (None before its first forward): hooks keep
        per-forward state per thread, so concurrent ``generate()`` calls each read their own.
        Still readable after ``remove()`` (the removing thread's last trace)."""
        return self._engine.state.trace if self._engine is not None else self._final_trace

    @property
    def kept_columns(self) -> torch.Tensor | None:
        """(B, L_out): the ``input_ids`` column of each position of the calling thread's last
        prefill's output (logits, hidden states), -1 for inserted padding; None when the sequence
        was not shortened. Pruning makes ``logits`` shorter than ``input_ids``; this maps them back."""
        return kept_columns(self._engine.state) if self._engine is not None else None

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

    Patching a model that already has a patch replaces it; patching a module inside or around a
    patched one raises :class:`~tokenprune.errors.PatchedModelError`. ``copy.deepcopy(model)`` gives
    a copy with its own equivalent patch (:func:`handle_of`); pickling a patched model raises
    ``PatchedModelError`` (save ``model.state_dict()``). Returns a :class:`PatchHandle`.
    """
    check_int8_flag(int8)  # before touching the model: bitsandbytes must be importable
    budget = check_budget(budget) if budget is not None else None
    m = build(method, **params)
    anatomy = anatomy_of(model)
    stages = plan(m, anatomy, budget)
    _refuse_nesting(model)
    unpatch(model)
    engine = Engine(anatomy, stages, m.install)
    if int8:  # after every check passed; hooks on replaced linears move to the int8 layers
        try:
            quantize_int8(model)
        except Exception:
            engine.remove()
            raise
    handle = PatchHandle(model, m, budget, engine)
    engine.hooks.setattr(model, "__deepcopy__", functools.partial(_deepcopy_patched, handle))
    engine.hooks.setattr(model, "__reduce_ex__", _refuse_pickling)
    model.__dict__[_ATTR] = handle
    _LIVE.add(handle)
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


def handle_of(model: nn.Module) -> PatchHandle | None:
    """The active patch on ``model`` (e.g. the one ``copy.deepcopy`` gave a copy), or None."""
    return model.__dict__.get(_ATTR)


def _refuse_nesting(model: nn.Module) -> None:
    """A patch inside or around another would prune twice and each trace would describe half."""
    inside = {id(m) for m in model.modules()}
    for other in list(_LIVE):
        if not other.active or other.model is model:
            continue
        if id(other.model) in inside or any(id(m) in inside for m in other._engine.hooks.modules()):
            where = "inside" if id(other.model) in inside else "around"
            raise PatchedModelError(
                f"model: a {type(other.model).__name__} {where} this {type(model).__name__} is already patched "
                f"({other!r}); nested patches would prune twice. Remove it first (handle.remove() or "
                "tokenprune.unpatch(...) on that module), or patch one of the two"
            )


def _deepcopy_patched(handle: PatchHandle, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a patched model: a plain copy of the modules (the patch's hooks taken
    off it), carrying its own equivalent, independent patch (a new handle: :func:`handle_of`)."""
    model = handle.model
    memo[id(handle)] = None  # the old handle (and its per-thread state) is not copied
    clone = copy._reconstruct(model, memo, *type(model).__reduce_ex__(model, 4))
    handle._engine.hooks.strip_copy(memo)
    clone.__dict__.pop(_ATTR, None)
    patch(clone, copy.deepcopy(handle.method), handle.budget)
    return clone


def _refuse_pickling(protocol: int):
    raise PatchedModelError(
        "model: a patched model cannot be pickled (torch.save(model), copy.copy): its hooks are closures over this "
        "process's modules. Save model.state_dict() (the weights are unchanged by the patch), or call "
        "tokenprune.unpatch(model) first and patch again after loading"
    )


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
