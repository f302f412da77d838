"""The method interface and registry."""

from __future__ import annotations

import dataclasses
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
        raise NotImplementedError


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


def build(method: str | Method, **params) -> Method:
    """A method instance from its registered name and parameters (or an instance as is)."""
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
