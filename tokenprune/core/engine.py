"""Installs a method's stages on a model: the glue between sites, shared state and the trace."""

from __future__ import annotations

from collections.abc import Callable

from ..adapters.base import Anatomy
from ..errors import NoMatchError, SiteError
from .guards import guard_forward, guard_generate
from .hooks import HookSet
from .labels import install_labels
from .llm_site import install_llm
from .prellm_site import install_pre_llm
from .stage import SITES, Stage
from .state import ForwardState
from .vision_site import install_vision


class Engine:
    """The hooks and per-forward state of one patch: the stages' hooks, then those of
    ``install`` (a method's own non-stage hooks, e.g. early exit)."""

    def __init__(self, anatomy: Anatomy, stages: list[Stage], install: Callable | None = None) -> None:
        self.anatomy = anatomy
        self.state = ForwardState()
        self.hooks = HookSet()
        by_site = {s: [st for st in stages if st.site == s] for s in SITES}
        unknown = [st.site for st in stages if st.site not in SITES]
        if unknown:
            raise SiteError(f"site: unknown site(s) {unknown}; allowed: {list(SITES)}")
        missing = [s for s in SITES if by_site[s] and s not in anatomy.sites]
        if missing:
            raise SiteError(
                f"method: acts at the {missing[0]} site, which a {anatomy.name} model does not have "
                f"(its sites: {list(anatomy.sites)})"
            )
        if len(by_site["pre_llm"]) > 1:
            raise SiteError("method: at most one pre_llm stage")
        try:
            if anatomy.is_vlm:
                guard_forward(anatomy.vlm_core, self.hooks)  # first hook of every forward
                guard_generate(anatomy.model, self.hooks)
            if by_site["vision"]:
                if anatomy.vision.vision_site is not None:
                    raise SiteError(f"method: {anatomy.vision.vision_site}")
                install_vision(anatomy, by_site["vision"], self.state, self.hooks, standalone=not anatomy.is_vlm)
            if anatomy.is_vlm:
                install_pre_llm(anatomy, (by_site["pre_llm"] or [None])[0], self.state, self.hooks)
            if by_site["llm"]:
                install_llm(anatomy, by_site["llm"], self.state, self.hooks)
            if anatomy.is_vlm:
                install_labels(anatomy.model, self.state, self.hooks)
            if install is not None:
                install(anatomy, self.hooks, self.state)
        except Exception:
            self.hooks.remove()
            raise
        if len(self.hooks) == 0 or not (stages or install):
            self.hooks.remove()
            raise NoMatchError(f"method: it matched no layer of this {anatomy.name} model")

    def remove(self) -> None:
        self.hooks.remove()
        self.state = ForwardState()
