"""The ``tokenprune`` entry of a vLLM model's ``hf_config``: parse it, build the method, and check
that vLLM can serve it. Imports nothing from vLLM, so it is testable (and usable) without it.

``hf_overrides={"tokenprune": {"method": "visionzip", "budget": 0.25}}`` puts the dict on
``hf_config.tokenprune``; any other key is a parameter of the method (``{"method": "random",
"budget": 0.25, "seed": 3}``). Validation raises tokenprune's typed errors (``tokenprune.errors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..adapters.base import Anatomy
from ..core.budget import check_budget
from ..core.stage import Stage
from ..errors import MethodArgumentError, SiteError, UnsupportedModelError
from ..methods import REGISTRY, Method, build

KEY = "tokenprune"
SERVED_SITE = "pre_llm"
# pre-LLM methods checked in vLLM against the Hugging Face path (tests/vllm_plugin, evals/vllm_agreement.py);
# other single-stage pre-LLM methods are refused until they are
TESTED = ("random", "uniform", "visionzip", "hired", "divprune", "vispruner", "pool")
# pre-LLM methods whose choice reads the request's text (the ``instruction`` / ``embed`` scorers)
READS_PROMPT = ("cdpruner",)
PROMPT_REASON = (
    "its choice depends on the request's instruction text, but vLLM encodes each image once, without the "
    "prompt, and reuses the encoding for every request with the same image (its encoder and prefix caches are "
    "keyed by the image's hash), so the kept tokens could not follow the prompt"
)


@dataclass(frozen=True)
class ServeSpec:
    """A validated method for one served model: ``stage`` is its single pre-LLM stage, whose
    ``select`` is the same code the Hugging Face hooks call; ``anatomy`` lays out image tokens."""

    method: Method
    budget: float | None
    stage: Stage
    anatomy: Anatomy

    @property
    def keeps_everything(self) -> bool:
        """Budget 1.0 keeps every visual token: the model then runs exactly as stock vLLM."""
        return self.budget == 1.0


def raw_spec(hf_config: Any) -> dict | None:
    """The user's ``tokenprune`` dict from ``hf_config`` (None when absent: stock vLLM)."""
    raw = getattr(hf_config, KEY, None)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise MethodArgumentError(
            f"{KEY}: expected a dict such as {{'method': 'visionzip', 'budget': 0.25}}, got {raw!r}"
        )
    return raw


def hf_anatomy(hf_config: Any) -> Anatomy:
    """tokenprune's adapter view of the Hugging Face model this config describes, built on the meta
    device (no weights, no memory): what a method's ``stages()`` reads (layer counts, feature layer)."""
    import transformers

    from ..adapters import anatomy_of

    arch = (getattr(hf_config, "architectures", None) or [type(hf_config).__name__])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise UnsupportedModelError(f"model: {arch} has no Hugging Face class tokenprune can read")
    with torch.device("meta"):
        model = cls._from_config(hf_config)
    return anatomy_of(model)


def servable(method: Method, stages: list[Stage]) -> str | None:
    """Why ``method`` cannot run inside vLLM, or None when it can: exactly one stage, before the LLM,
    and no hooks of its own."""
    if type(method).install is not Method.install:
        return f"{method.name} installs hooks of its own (early exit), which vLLM's model runner never calls"
    if len(stages) != 1 or stages[0].site != SERVED_SITE:
        sites = sorted({st.site for st in stages})
        where = "inside the LLM" if "llm" in sites else "inside the vision encoder" if "vision" in sites else ""
        return (
            f"{method.name} acts {where} (site {', '.join(sites) or 'none'}); vLLM fixes each image's placeholder "
            "count when the prompt is processed and pages the KV cache, so only methods that choose once, between "
            "the projector and the LLM, can be served"
        )
    return None


def servable_methods(anatomy: Anatomy) -> list[str]:
    """Registered methods vLLM can serve on ``anatomy`` with their defaults at a mid budget."""
    names = []
    for name in sorted(set(REGISTRY) & set(TESTED)):
        try:
            m = build(name)
            if servable(m, m.stages(anatomy, 0.5)) is None:
                names.append(name)
        except Exception:  # a method that cannot build at its defaults is not listed
            continue
    return names


def build_spec(raw: dict, anatomy: Anatomy) -> ServeSpec:
    """Validate the user's dict and build the method's stage; typed errors name the parameter."""
    params = dict(raw)
    name = params.pop("method", None)
    if name is None:
        raise MethodArgumentError(f"{KEY}: 'method' is required; servable methods: {servable_methods(anatomy)}")
    if not isinstance(name, str):
        raise MethodArgumentError(f"{KEY}: 'method' must be a method name (a string), got {name!r}")
    budget = params.pop("budget", None)
    if budget is not None:
        budget = check_budget(budget)
    method = build(name, **params)
    stages = method.stages(anatomy, budget)
    why = servable(method, stages)
    if why is None and method.name in READS_PROMPT:
        why = f"{method.name} is not served by the vLLM plugin: {PROMPT_REASON}"
    if why is None and method.name not in TESTED:
        why = f"{method.name} is not served by the vLLM plugin yet (not checked against the Hugging Face path there)"
    if why is not None:
        raise SiteError(f"method: {why}; servable methods: {servable_methods(anatomy)}")
    return ServeSpec(method, budget, stages[0], anatomy)
