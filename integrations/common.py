"""One pruned VLM and the two requests the harnesses send: generate and (image) log-likelihood."""

from __future__ import annotations

from typing import Any

import torch

from tokenprune.evals.models import build_prompt, load_model, resolve_dtype
from tokenprune.evals.runner import method_params

IMAGE_TOKEN = "<image>"


def _parse_budget(value: Any) -> float | None:
    return None if value in (None, "", "none", "None") else float(value)


class PrunedVLM:
    """A LLaVA / LLaVA-NeXT checkpoint (or ``bundled:llava``) with ``tokenprune.patch`` applied from
    string arguments, as harness model args arrive: ``method`` (``none`` = unpruned), ``budget`` and
    the method's own parameters (``k=3``, ``seed=1``, ...). ``stats`` accumulates what pruning did."""

    def __init__(self, pretrained: str = "bundled:llava", method: str = "none", budget: Any = None,
                 device: str = "cpu", dtype: str | None = None, attn_implementation: str = "sdpa",
                 int8: bool = False, prompt_style: str = "auto", max_new_tokens: int = 16, seed: int = 0,
                 **method_kwargs: Any) -> None:
        import tokenprune

        self.model, self.processor = load_model(str(pretrained), device, dtype, attn_implementation, bool(int8))
        self.device = device
        self.dtype = resolve_dtype(dtype)
        bundled = str(pretrained).startswith("bundled:")  # fixtures were trained on LLaVA-1.5's prompt
        self.prompt_style = "llava" if prompt_style == "auto" and bundled else prompt_style
        self.max_new_tokens = int(max_new_tokens)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.method = str(method)
        self.handle = None
        if self.method != "none":
            params = {**method_params(self.method, int(seed)), **method_kwargs}
            self.handle = tokenprune.patch(self.model, self.method, budget=_parse_budget(budget), **params)
        self.stats = {"requests": 0, "realized_budget_sum": 0.0}

    def _inputs(self, text: str, images: list[Any], extra: str = "") -> dict[str, torch.Tensor]:
        text = text.replace(IMAGE_TOKEN, "").strip()
        if images:
            prompt = build_prompt(self.processor, text, self.prompt_style) + extra
            enc = self.processor(images=images[:1], text=[prompt], return_tensors="pt")
        else:  # text-only request: no image token
            prompt = build_prompt(self.processor, text, self.prompt_style).replace(IMAGE_TOKEN + "\n", "") + extra
            enc = self.tokenizer([prompt], return_tensors="pt")
        out = {}
        for k, v in enc.items():
            v = v.to(self.device)
            out[k] = v.to(self.dtype) if v.is_floating_point() and self.dtype is not None else v
        return out

    def _note(self) -> None:
        self.stats["requests"] += 1
        tr = self.handle.trace if self.handle is not None else None
        self.stats["realized_budget_sum"] += tr.realized_budget if tr is not None else 1.0

    def generate(self, text: str, images: list[Any], gen_kwargs: dict[str, Any] | None = None) -> str:
        """Greedy continuation of ``text`` about ``images`` (first image used), cut at ``until`` strings."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kw.pop("max_new_tokens", None) or kw.pop("max_gen_toks", None) or self.max_new_tokens)
        inputs = self._inputs(text, images)
        with torch.no_grad():
            seq = self.model.generate(**inputs, max_new_tokens=max_new, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        self._note()
        out = self.tokenizer.decode(seq[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for stop in until:
            if stop and stop in out:
                out = out.split(stop)[0]
        return out.strip()

    def loglikelihood(self, context: str, continuation: str, images: list[Any]) -> tuple[float, bool]:
        """Sum of log-probabilities of ``continuation`` after the prompt, and whether it is the greedy one.

        One forward over prompt + continuation, as the harnesses' own LLaVA models score. Pruning drops
        visual tokens only, and they all sit in the prompt, so the logits are shorter than ``input_ids`` by
        the dropped count and the continuation (text, never pruned) keeps its place at their end. A method
        that ranks tokens inside the LLM by the last token's attention ranks them by the continuation's
        last token here (as in a single forward of the official FastV / PyramidDrop code)."""
        ctx = self._inputs(context, images)
        full = self._inputs(context, images, extra=continuation)
        n_ctx = ctx["input_ids"].shape[1]
        with torch.no_grad():
            logits = self.model(**full).logits[0].float()
        self._note()
        ids = full["input_ids"][0]
        dropped = ids.numel() - logits.shape[0]
        visual = int((ids[:n_ctx] == self.model.config.image_token_id).sum())
        if not 0 <= dropped <= visual:
            raise RuntimeError(f"logits are {dropped} shorter than the input, which has {visual} visual tokens")
        target = ids[n_ctx:]
        pred = logits[n_ctx - dropped - 1 : logits.shape[0] - 1].log_softmax(-1)
        lp = pred.gather(-1, target[:, None]).squeeze(-1)
        return float(lp.sum()), bool((pred.argmax(-1) == target).all())
