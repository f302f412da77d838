"""The method interface and registry."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ..adapters.base import Anatomy
from ..core.stage import Stage
from ..errors import BudgetError, MethodArgumentError, SiteError, UnknownMethodError

REGISTRY: dict[str, type[Method]] = {}


class Method:
    """A token-reduction method: a small dataclass of its own parameters that turns a budget into
    stages (where it acts and how it chooses). Methods touch models only through the
    :class:`~tokenprune.adapters.base.Anatomy` and the stage :class:`~tokenprune.core.stage.Context`.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    sites: ClassVar[tuple[str, ...]] = ("vision", "pre_llm", "llm")
    reduces_tokens: ClassVar[bool] = True  # False: a mechanism that keeps every token (early exit)

    @property
    def uses_budget(self) -> bool:
        """Whether ``budget`` sets this instance's schedule (False where explicit parameters fix it,
        or where the method reduces no tokens)."""
        return self.reduces_tokens

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        """The token-reduction stages this method installs for ``budget`` on ``anatomy``."""
        raise NotImplementedError

    def install(self, anatomy: Anatomy, hooks, state) -> None:
        """Hooks for mechanisms that are not token stages (early exit); nothing by default.
        ``hooks`` is the patch's :class:`~tokenprune.core.hooks.HookSet` (removed with it) and
        ``state`` its :class:`~tokenprune.core.state.ForwardState`."""


@dataclass
class Compose(Method):
    """Several methods applied together (``patch(model, ["hired", "pdrop"])``); each method's tokens
    feed the next (vision tower, then before the LLM, then inside it).

    ``budget`` keeps its one meaning for the whole composition and is split evenly over the m
    token-reducing methods: each keeps ``budget ** (1 / m)`` of the visual-token compute that reaches
    it, so the fractions multiply back to ``budget`` (``["hired", "pdrop"]`` at 0.3: HiRED passes
    54.8 % of the tokens to the LLM, PyramidDrop keeps a mean of 54.8 % of those over its layers).
    The product is exact only while at most one method acts inside the budgeted stack (the LLM of a
    VLM, the encoder of a standalone encoder), where the budget is a mean over layers; two there are
    refused. Methods that reduce no tokens (early exit) take no share. Without a budget every
    method runs its explicit schedule."""

    name = "compose"
    summary = "several methods applied together"
    parts: tuple[Method, ...] = ()

    def __post_init__(self) -> None:
        self.name = "+".join(p.name for p in self.parts)
        self.sites = tuple(dict.fromkeys(s for p in self.parts for s in p.sites))
        self.reduces_tokens = any(p.reduces_tokens for p in self.parts)

    @property
    def uses_budget(self) -> bool:
        return any(p.uses_budget for p in self.parts)

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        for p in self.parts:
            check_sites(p, anatomy)
        if budget is None:
            return [st for p in self.parts for st in p.stages(anatomy, None)]
        fixed = [p.name for p in self.parts if p.reduces_tokens and not p.uses_budget]
        if fixed:
            raise BudgetError(
                f"budget: {self.name} splits the budget over its token methods, but {fixed} have explicit "
                "schedules; give either a budget (and no explicit schedules) or explicit schedules and no budget"
            )
        shared = [p for p in self.parts if p.uses_budget]
        share = budget ** (1 / len(shared))
        stack = "llm" if anatomy.is_vlm else "vision"
        out, inside = [], []
        for p in self.parts:
            try:
                own = p.stages(anatomy, share if p.uses_budget else None)
            except BudgetError as exc:
                raise BudgetError(
                    f"budget: {budget} split over {[q.name for q in shared]} is {share:.3f} each, and for {p.name}: "
                    + str(exc).removeprefix("budget: ")
                ) from None
            if p.uses_budget and any(st.site == stack for st in own):
                inside.append(p.name)
            out += own
        if len(inside) > 1:
            raise BudgetError(
                f"budget: {inside} all prune inside the {'LLM' if anatomy.is_vlm else 'encoder'}, where the budget "
                "is a mean over layers that their shares cannot split exactly; compose at most one of them with "
                "methods acting earlier, or give explicit schedules and no budget"
            )
        return out

    def install(self, anatomy: Anatomy, hooks, state) -> None:
        for p in self.parts:
            p.install(anatomy, hooks, state)


def check_sites(m: Method, anatomy: Anatomy) -> None:
    """A :class:`SiteError` unless ``m`` can act at one of ``anatomy``'s sites (with the adapter's
    reason where it refuses the vision site)."""
    refused = anatomy.vision.vision_site
    usable = [s for s in anatomy.sites if not (s == "vision" and refused)]
    if set(m.sites) & set(usable):
        return
    why = f"; vision: {refused}" if refused and "vision" in m.sites else ""
    raise SiteError(
        f"method: {m.name} acts at the {' or '.join(m.sites)} site, which a {anatomy.name} model does not have "
        f"(its sites: {usable}){why}"
    )


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


def build(method: str | Method | list | tuple, **params) -> Method:
    """A method instance from its registered name and parameters (or an instance as is); a list
    of names or instances composes them (parameters then go into instances)."""
    if isinstance(method, (list, tuple)):
        if params:
            raise MethodArgumentError(
                f"method: parameters {sorted(params)} are ambiguous with a list of methods; pass instances, "
                "e.g. tokenprune.method('fastv', k=3)"
            )
        if not method:
            raise UnknownMethodError("method: an empty list of methods")
        return Compose(tuple(build(m) for m in method))
    if isinstance(method, Method):
        if params:
            raise MethodArgumentError(f"method: parameters {sorted(params)} given with a method instance")
        return method
    if not isinstance(method, str) or method not in REGISTRY:
        raise UnknownMethodError(f"method: unknown method {method!r}; available: {sorted(REGISTRY)}")
    cls = REGISTRY[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise MethodArgumentError(f"{method}: unknown parameter(s) {unknown}; allowed: {sorted(fields)}")
    return cls(**params)


def option(name: str, value, allowed) -> None:
    """Raise a :class:`MethodArgumentError` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise MethodArgumentError(f"{name}: expected one of {list(allowed)}, got {value!r}")
