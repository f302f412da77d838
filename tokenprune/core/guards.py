"""Refusals of the generate()/forward options a patch cannot serve exactly, raised at the first
place that sees them: ``generate(prefill_chunk_size=...)`` (chunks cut the prompt before the
pruning sees it whole) and static KV caches (``cache_implementation="static"``: fixed-size
layers that pruned layers and compacted prompts cannot index)."""

from __future__ import annotations

import functools

from ..errors import UnsupportedPathError
from .hooks import HookSet
from .state import cache_of


def check_cache(cache) -> None:
    """Refuse a static (fixed-size, compileable) KV cache."""
    if cache is not None and getattr(cache, "is_compileable", False):
        raise UnsupportedPathError(
            f"cache_implementation: a patched model needs the default dynamic KV cache, got {type(cache).__name__} "
            "(pruned layers keep fewer entries than a fixed-size cache indexes); drop cache_implementation='static' "
            "or pass past_key_values=DynamicCache()"
        )


def _generation_option(model, kwargs: dict, name: str):
    """``name`` as generate() will see it: a keyword, else the passed config, else the model's."""
    for source in (kwargs, kwargs.get("generation_config"), model.generation_config):
        value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
        if value is not None:
            return value
    return None


def guard_generate(model, hooks: HookSet) -> None:
    """Wrap ``model.generate`` on the instance (removed with the patch) to refuse chunked prefill
    and static caches before anything runs."""
    original = getattr(model, "generate", None)
    if original is None or getattr(model, "generation_config", None) is None:
        return

    @functools.wraps(original)
    def generate(*args, **kwargs):
        if _generation_option(model, kwargs, "prefill_chunk_size") is not None:
            raise UnsupportedPathError(
                "prefill_chunk_size: a patched model prunes whole prompts, which chunked prefill cuts apart; "
                "use prefill_chunk_size=None"
            )
        if _generation_option(model, kwargs, "cache_implementation") == "static":
            raise UnsupportedPathError(
                "cache_implementation: 'static' is not supported by a patched model (pruned layers keep fewer "
                "entries than a fixed-size cache indexes); use the default dynamic cache"
            )
        check_cache(cache_of(kwargs))
        return original(*args, **kwargs)

    hooks.setattr(model, "generate", generate)


def guard_forward(module, hooks: HookSet) -> None:
    """Pre-hook on the first module a forward reaches that refuses a static cache."""
    hooks.pre(module, lambda mod, kw: check_cache(cache_of(kw)))
