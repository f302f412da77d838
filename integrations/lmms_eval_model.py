"""lmms-eval model ``tokenprune``: a LLaVA / LLaVA-NeXT checkpoint pruned by ``tokenprune.patch``.

Registered through the ``lmms_eval.models`` entry point (``manifest`` below), so once tokenprune-vlm
is installed::

    lmms-eval --model tokenprune --model_args pretrained=PATH,method=fastv,budget=0.2 --tasks ...

Model args: ``pretrained`` (folder or ``bundled:llava``), ``method`` (``none`` = unpruned), ``budget``,
``device``, ``dtype``, ``attn_implementation``, ``int8``, ``prompt_style``, ``max_new_tokens`` (default
when the task gives none) and the method's own parameters. Batch size 1 (lmms-eval's LLaVA setting);
the first image of a request is used; ``until`` stop strings are applied to the output.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from .common import PrunedVLM

MODEL_ID = "tokenprune"


class TokenpruneLMM(lmms):
    """lmms-eval "simple" model over :class:`~integrations.common.PrunedVLM`."""

    is_simple = True

    def __init__(self, pretrained: str = "bundled:llava", method: str = "none", budget: Any = None,
                 batch_size: int = 1, **kwargs: Any) -> None:
        super().__init__()
        if int(batch_size) != 1:
            raise ValueError("tokenprune lmms-eval model: batch_size must be 1")
        self.vlm = PrunedVLM(pretrained=pretrained, method=method, budget=budget, **kwargs)
        self.batch_size_per_gpu = 1

    @property
    def model(self) -> Any:
        return self.vlm.model

    def _visuals(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> list[Any]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return [v for v in (visuals or []) if v is not None]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            out.append(self.vlm.generate(context, self._visuals(doc_to_visual, doc_id, task, split), gen_kwargs))
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            out.append(self.vlm.loglikelihood(context, continuation,
                                              self._visuals(doc_to_visual, doc_id, task, split)))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("tokenprune lmms-eval model: multi-round generation is not supported")


def manifest() -> ModelManifest:
    """The entry point target (group ``lmms_eval.models``)."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.TokenpruneLMM")
