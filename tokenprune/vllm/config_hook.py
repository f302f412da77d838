"""Engine-start check and configuration: vLLM calls a per-architecture hook when it builds the model
config (in the process that creates the engine, before any worker starts), so a bad method or budget
fails there with tokenprune's typed error. When a method prunes, the hook also routes positions
through vLLM's M-RoPE path (a rope section on the text config; with the three position rows equal
this is exactly the model's own 1-D RoPE), so the model can give every token its original position
(see ``positions.py``), and runs the model eagerly (vLLM compiles Llama-style models for 1-D positions).
"""

from __future__ import annotations

from typing import Any

from ..errors import SiteError
from .spec import ServeSpec, build_spec, hf_anatomy, raw_spec

_SPECS: dict[int, tuple[Any, ServeSpec | None]] = {}


def spec_of(hf_config: Any) -> ServeSpec | None:
    """The validated spec of a model config (None: no ``tokenprune`` key), built once per config
    object in each process."""
    got = _SPECS.get(id(hf_config))
    if got is None or got[0] is not hf_config:
        raw = raw_spec(hf_config)
        got = (hf_config, None if raw is None else build_spec(raw, hf_anatomy(hf_config)))
        _SPECS[id(hf_config)] = got
    return got[1]


def mrope_section(head_dim: int) -> list[int]:
    """A 3-way split of the rotary frequencies (any split is exact when the three position rows are equal)."""
    half = head_dim // 2
    return [half - 2 * (half // 3), half // 3, half // 3]


def enable_original_positions(model_config: Any) -> None:
    """Route positions through vLLM's M-RoPE path (see module doc), eagerly."""
    text = model_config.hf_config.get_text_config()
    rope = dict(getattr(text, "rope_parameters", None) or {"rope_type": "default"})
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if "mrope_section" not in rope:  # a 1-D RoPE model (an M-RoPE one, as Qwen2.5-VL, has its own)
        rope["mrope_section"] = mrope_section(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        text.rope_parameters = rope
    # vLLM compiles Llama-style language models for 1-D positions (dim 0 dynamic); (3, L) M-RoPE positions
    # would be specialised to one length, so a pruned model runs eagerly (no torch.compile, no CUDA graphs)
    model_config.enforce_eager = True


def hook_for(previous: type | None) -> type:
    """vLLM's per-architecture config hook with tokenprune's step, chained to the hook vLLM already
    had for the architecture (if any)."""
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    base = previous or VerifyAndUpdateConfig

    class TokenpruneConfig(base):
        @staticmethod
        def verify_and_update_model_config(model_config: Any) -> None:
            base.verify_and_update_model_config(model_config)
            spec = spec_of(model_config.hf_config)
            if spec is not None and not spec.keeps_everything:
                enable_original_positions(model_config)

        @staticmethod
        def verify_and_update_config(vllm_config: Any) -> None:
            base.verify_and_update_config(vllm_config)
            spec = spec_of(vllm_config.model_config.hf_config)
            pp = vllm_config.parallel_config.pipeline_parallel_size
            if spec is None or spec.keeps_everything:
                return
            if pp > 1:
                raise SiteError(
                    f"pipeline_parallel_size: tokenprune serves pruned models with 1 pipeline stage (got {pp}); "
                    "the first stage computes each kept token's original position. Use tensor parallelism"
                )
            mm = vllm_config.model_config.multimodal_config
            if getattr(mm, "mm_encoder_tp_mode", "weights") == "data":
                raise SiteError(
                    "mm_encoder_tp_mode: 'data' splits a batch's images over ranks, but the selection reads every "
                    "image's encoder attention on each rank; allowed with tokenprune: 'weights'"
                )
            if getattr(mm, "is_multimodal_pruning_enabled", lambda: False)():
                raise SiteError(
                    "video_pruning_rate: vLLM's own video pruning (EVS) rewrites every image's embeddings and "
                    "positions as well, which tokenprune's pruning does; use one of them"
                )
            videos = any(m.name == "video" for m in spec.anatomy.sequence.modalities)
            if videos and mm.get_limit_per_prompt("video") != 0:
                raise SiteError(
                    "limit_mm_per_prompt: tokenprune prunes this model's images; its videos are not served while "
                    "pruning: start the engine with limit_mm_per_prompt={'image': N, 'video': 0}"
                )

    return TokenpruneConfig
