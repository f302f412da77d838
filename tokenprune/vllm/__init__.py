"""tokenprune inside vLLM: pre-LLM visual-token pruning for served models.

Installed with ``pip install tokenprune-vlm[vllm]``; vLLM loads :func:`register` through the
``vllm.general_plugins`` entry point in each of its processes. Then::

    LLM(model=path, hf_overrides={"tokenprune": {"method": "visionzip", "budget": 0.25}})
    vllm serve path --hf-overrides '{"tokenprune": {"method": "visionzip", "budget": 0.25}}'

Without the ``tokenprune`` key a model runs as stock vLLM. The served methods are tokenprune's own
(``stage.select`` of the method, the code the Hugging Face hooks run): those that choose once,
between the projector and the LLM (random, uniform, visionzip, hired, ...). LLM-internal methods
(FastV, PyramidDrop, FEATHER) are refused at engine start with a typed error.
"""

from __future__ import annotations

ARCHITECTURES = {"LlavaForConditionalGeneration": "tokenprune.vllm.llava:TokenpruneLlavaForConditionalGeneration"}


def register() -> None:
    """vLLM general plugin (idempotent; runs in the main, engine-core and worker processes): put
    tokenprune's subclasses under the stock architecture names and their config check in vLLM's
    per-architecture config hooks, which run when the engine's config is built."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .config_hook import hook_for

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
        current = MODELS_CONFIG_MAP.get(arch)
        if not hasattr(current, "tokenprune_previous"):
            MODELS_CONFIG_MAP[arch] = hook_for(current)
