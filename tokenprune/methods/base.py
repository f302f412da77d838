"""The method interface and registry."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ..adapters.base import Anatomy
from ..core.stage import Stage
from ..errors import MethodArgumentError, UnknownMethodError

REGISTRY: dict[str, type[Method]] = {}


class Method:
    """A token-reduction method: a small dataclass of its own parameters that turns a budget into
    stages (where it acts and how it chooses). Methods touch models only through the
    :class:`~tokenprune.adapters.base.Anatomy` and the stage :class:`~tokenprune.core.stage.Context`.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    sites: ClassVar[tuple[str, ...]] = ("vision", "pre_llm", "llm")

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        """The token-reduction stages this method installs for ``budget`` on ``anatomy``."""
        raise NotImplementedError

    def install(self, anatomy: Anatomy, hooks, state) -> None:
        """Hooks for mechanisms that are not token stages (early exit); nothing by default.
        ``hooks`` is the patch's :class:`~tokenprune.core.hooks.HookSet` (removed with it) and
        ``state`` its :class:`~tokenprune.core.state.ForwardState`."""


@dataclass
class Compose(Method):
    """Several methods applied together (``patch(model, ["pdrop", "early_exit"])``): the stages of
    all of them, in order, each given the same ``budget``."""

    name = "compose"
    summary = "several methods applied together"
    parts: tuple[Method, ...] = ()

    def __post_init__(self) -> None:
        self.name = "+".join(p.name for p in self.parts)
        self.sites = tuple(dict.fromkeys(s for p in self.parts for s in p.sites))

    def stages(self, anatomy: Anatomy, budget: float | None) -> list[Stage]:
        return [st for p in self.parts for st in p.stages(anatomy, budget)]

    def install(self, anatomy: Anatomy, hooks, state) -> None:
        for p in self.parts:
            p.install(anatomy, hooks, state)


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
