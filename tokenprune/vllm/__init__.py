"""tokenprune inside vLLM: pre-LLM visual-token pruning for served models.

Installed with ``pip install tokenprune-vlm[vllm]``; vLLM loads :func:`register` through the
``vllm.general_plugins`` entry point in each of its processes. Then::

    LLM(model=path, hf_overrides={"tokenprune": {"method": "visionzip", "budget": 0.25}})
    vllm serve path --hf-overrides '{"tokenprune": {"method": "visionzip", "budget": 0.25}}'

Without the ``tokenprune`` key a model runs as stock vLLM. Served architectures: LLaVA, LLaVA-NeXT,
Qwen2.5-VL (images). The served methods are tokenprune's own (``stage.select`` of the method, the code
the Hugging Face hooks run): those that choose once, between the projector and the LLM, without reading
the prompt (``spec.TESTED``: random, uniform, visionzip, hired, divprune, vispruner, pool). Others
(LLM-internal FastV, PyramidDrop, FEATHER; CDPruner, which reads the prompt) are refused at engine
start with a typed error.
"""

from __future__ import annotations

from pathlib import Path

_REGISTERED = False
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "tokenprune.vllm.llava:TokenpruneLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "tokenprune.vllm.llava_next:TokenpruneLlavaNextForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "tokenprune.vllm.qwen2_5_vl:TokenpruneQwen2_5_VLForConditionalGeneration",
}


def register() -> None:
    """vLLM general plugin (idempotent; runs in the main, engine-core and worker processes): put
    tokenprune's subclasses under the stock architecture names and their config check in vLLM's
    per-architecture config hooks, which run when the engine's config is built."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils.chat_templates.registry import register_chat_template_fallback_path

    from .config_hook import hook_for

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
        MODELS_CONFIG_MAP[arch] = hook_for(MODELS_CONFIG_MAP.get(arch))
    for model_type in FIXTURE_TEMPLATES:
        register_chat_template_fallback_path(model_type, fixture_chat_template)
    _REGISTERED = True


# the chat templates of tokenprune's bundled fixtures, by kind (= model type)
FIXTURE_TEMPLATES = {
    "llava": "llava_fixture.jinja",
    "llava_next": "llava_fixture.jinja",
    "qwen2_5_vl": "qwen2_5_vl_fixture.jinja",
}


def fixture_chat_template(tokenizer_path: str) -> Path | None:
    """The chat template of a tokenprune bundled fixture (they ship none; vLLM's chat and ``vllm serve``
    need one): its training prompt ``<s>USER: <image>\n{question} ASSISTANT:`` (Qwen2.5-VL: the image as
    ``<|vision_start|><|image_pad|><|vision_end|>``). Any other model of these types without a template
    gets none, as in stock vLLM."""
    from ..demo import checkpoint_path

    try:
        path = Path(tokenizer_path).resolve()
        kind = next((k for k in FIXTURE_TEMPLATES if checkpoint_path(k).resolve() == path), None)
    except OSError:
        kind = None
    return None if kind is None else Path(__file__).with_name(FIXTURE_TEMPLATES[kind])
