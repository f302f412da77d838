"""lm-eval model ``tokenprune`` (multimodal path): a LLaVA / LLaVA-NeXT checkpoint pruned by
``tokenprune.patch``, registered with ``lm_eval.api.registry.register_model`` when this module is
imported. lm-eval has no plugin discovery for models, so import it before resolving the name::

    python -m tokenprune.integrations.lm_eval_model --model tokenprune \\
        --model_args pretrained=PATH,method=fastv,budget=0.2 --tasks mmmu_val ...   # = lm_eval CLI

(``python -m integrations.lm_eval_model`` from a checkout), or in Python:
``import tokenprune.integrations.lm_eval_model`` then ``lm_eval.simple_evaluate(model="tokenprune", ...)``.
Requests carry images as ``{"visual": [PIL, ...]}`` (tasks with ``doc_to_image``); text-only requests
run without an image. ``<image>`` placeholders in the context are dropped (one image, LLaVA prompt).
"""

from __future__ import annotations

import sys
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .common import PrunedVLM

MODEL_ID = "tokenprune"


def _visuals(args: tuple) -> list[Any]:
    extra = args[2] if len(args) > 2 and isinstance(args[2], dict) else {}
    return list(extra.get("visual") or [])


@register_model(MODEL_ID)
class TokenpruneLM(LM):
    """lm-eval ``LM`` over :class:`~integrations.common.PrunedVLM`; ``MULTIMODAL = True``."""

    MULTIMODAL = True

    def __init__(self, pretrained: str = "bundled:llava", method: str = "none", budget: Any = None,
                 batch_size: Any = 1, **kwargs: Any) -> None:
        super().__init__()
        kwargs.pop("max_batch_size", None)
        self.vlm = PrunedVLM(pretrained=pretrained, method=method, budget=budget, **kwargs)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> TokenpruneLM:
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k in ("device",)}
        return cls(**args, **extra)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args[0], dict(req.args[1])
            out.append(self.vlm.generate(context, _visuals(req.args), gen_kwargs))
        return out

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [self.vlm.loglikelihood(r.args[0], r.args[1], _visuals(r.args)) for r in requests]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        return [self.vlm.loglikelihood("", r.args[0], [])[0] for r in requests]


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the ``tokenprune`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    cli_evaluate()


if __name__ == "__main__":
    main()
