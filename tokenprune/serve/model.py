"""The one model in memory: loading, per-request encoding and checks, and batched generation with
per-row streaming, stopping and token-reduction accounting.

Only the scheduler's worker thread calls :meth:`ModelRunner.generate`; :meth:`ModelRunner.encode`
and :meth:`ModelRunner.validate` run on request threads and never touch the model's weights.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .. import api
from ..adapters import anatomy_of
from ..core.budget import check_budget
from ..errors import TokenPruneError
from .errors import bad_request
from .protocol import IMAGE_PLACEHOLDER, ChatRequest, Limits, PromptFormat, Reduction

BUNDLED = ("llava", "llava_next", "qwen2_5_vl")


def load_model(spec: str) -> tuple[Any, Any]:
    """``(model, processor)`` for a bundled fixture name (``"llava"``, ``"llava_next"``, ``"qwen2_5_vl"``) or a
    ``save_pretrained`` folder; the tokenizer is set to left padding (tokenprune needs it)."""
    from .. import demo

    if spec in BUNDLED:
        model, processor = demo.load(spec)
    else:
        path = Path(spec)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model: {spec!r} is neither a bundled model {list(BUNDLED)} nor a model folder")
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type in BUNDLED:
            model, processor = demo.load(model_type, path=path)
        else:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    return model, processor


def prompt_format(model: Any, processor: Any) -> PromptFormat:
    """How requests to ``model`` are rendered: the processor's chat template when it has one (real checkpoints:
    LLaVA-1.5/NeXT/OneVision, Qwen2-VL/2.5-VL/3-VL), else the bundled fixtures' ``USER: ... ASSISTANT:`` turns with
    the model family's image text (``tokenprune.demo.prompt``). The processor's image token is reserved."""
    from ..demo.scoring import IMAGE_TEXT

    token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
    reserved = tuple(dict.fromkeys([IMAGE_PLACEHOLDER, token]))
    if getattr(processor, "chat_template", None):
        def chat(messages: list[dict[str, Any]]) -> str:
            return processor.apply_chat_template(messages, add_generation_prompt=True)

        return PromptFormat(token, reserved, chat)
    return PromptFormat(IMAGE_TEXT.get(model.config.model_type, token), reserved)


class RowSink(Protocol):
    """Where one row's output goes (called from the worker thread)."""

    cancelled: bool

    def on_first_token(self) -> None: ...

    def on_delta(self, text: str) -> None: ...

    def on_done(self, result: dict[str, Any]) -> None: ...


@dataclass
class Encoded:
    """One request turned into model inputs (batch dimension 1)."""

    inputs: dict[str, torch.Tensor]
    prompt_tokens: int
    visual_tokens: int
    max_tokens: int
    stop: list[str]
    request: ChatRequest
    return_kept: bool = False


@dataclass
class _Row:
    sink: RowSink
    enc: Encoded
    ids: list[int] = field(default_factory=list)
    sent: str = ""
    done: bool = False  # no more tokens wanted
    finished: bool = False  # result handed to the sink
    usage_ext: dict[str, Any] | None = None


class ModelRunner:
    """Holds the model, its processor and the current patch."""

    def __init__(self, model: Any, processor: Any, default: Reduction, limits: Limits, name: str) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # fast tokenizers are not safe to share between threads (encoding mutates padding state: "Already
        # borrowed"): processor calls hold _proc_lock, the worker decodes with its own copy
        self._proc_lock = threading.Lock()
        self.decoder = copy.deepcopy(self.tokenizer)
        self.limits = limits
        self.name = name
        self.prompt_format = prompt_format(model, processor)
        self.anatomy = anatomy_of(model)
        cfg = getattr(model.config, "text_config", model.config)
        self.context_length = int(getattr(cfg, "max_position_embeddings", 2048))
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self.eos_ids = _eos_ids(model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._handle: api.PatchHandle | None = None
        self._current: Reduction | None = Reduction(None, None)
        self._valid: dict[Reduction, Reduction] = {}
        self._lock = threading.Lock()
        self.default = Reduction(None, None)
        self.default = self.validate(default)

    # ---- request side (any thread) -------------------------------------------------------------
    def resolve(self, requested: Reduction | None) -> Reduction:
        """The reduction a request runs with: missing fields come from the server default."""
        if requested is None:
            return self.default
        if requested.method is None and requested.budget is None and not requested.params:
            return requested  # explicit "none"
        method = requested.method or self.default.method
        if method is None:
            raise bad_request("tokenprune.method: required (the server default is unpruned)", param="tokenprune.method")
        budget = requested.budget
        if budget is None and _uses_budget(method, requested.params):  # else explicit schedule / early exit
            budget = self.default.budget
        return self.validate(Reduction(method, budget, requested.params))

    def validate(self, red: Reduction) -> Reduction:
        """Check a reduction against the model as :func:`tokenprune.patch` does, without patching."""
        if red.method is None:
            return red
        with self._lock:
            if red in self._valid:
                return self._valid[red]
        try:
            budget = check_budget(red.budget) if red.budget is not None else None
            api.plan(api.method(red.method, **_thaw(red.params)), self.anatomy, budget)
        except (TokenPruneError, ValueError, TypeError) as exc:
            param = "tokenprune.budget" if "budget" in str(exc).split(":")[0] else "tokenprune.method"
            raise bad_request(str(exc), param=param, code=type(exc).__name__) from None
        ok = Reduction(red.method, budget, red.params)
        with self._lock:
            self._valid[red] = ok
        return ok

    def encode(self, req: ChatRequest) -> Encoded:
        """Processor outputs for one request, with the context-length check (CPU work)."""
        try:
            with self._proc_lock:
                inputs = self.processor(images=req.images, text=[req.prompt], return_tensors="pt")
        except Exception as exc:  # the processor rejects odd images/prompts with many exception types
            raise bad_request(f"messages: the processor could not encode the request: {exc}") from None
        inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        ids = inputs["input_ids"]
        n_prompt = int(ids.shape[1])
        n_visual = int((ids == self.image_token_id).sum()) if self.image_token_id is not None else 0
        room = self.context_length - n_prompt
        if req.max_tokens is None:
            max_tokens = min(self.limits.default_max_tokens, room)
            if max_tokens < 1:
                raise bad_request(
                    f"messages: the prompt is {n_prompt} tokens (images included); this model's context length "
                    f"is {self.context_length}",
                    param="messages",
                    code="context_length_exceeded",
                )
        else:
            max_tokens = req.max_tokens
            if n_prompt + max_tokens > self.context_length:
                raise bad_request(
                    f"messages: the prompt is {n_prompt} tokens (images included) and max_tokens is {max_tokens}; "
                    f"this model's context length is {self.context_length}",
                    param="messages",
                    code="context_length_exceeded",
                )
        return Encoded(inputs, n_prompt, n_visual, max_tokens, req.stop, req, req.return_kept)

    # ---- worker side (one thread) --------------------------------------------------------------
    def _apply(self, red: Reduction) -> None:
        """Patch the model for ``red`` (patching replaces the previous patch; none: unpatch)."""
        if red == self._current:
            return
        if red.method is None:
            api.unpatch(self.model)
            self._handle = None
        else:
            try:
                self._handle = api.patch(self.model, red.method, red.budget, **_thaw(red.params))
            except (TokenPruneError, ValueError, TypeError) as exc:  # a reduction validate() let through
                api.unpatch(self.model)
                self._handle, self._current = None, Reduction(None, None)
                raise bad_request(str(exc), param="tokenprune", code=type(exc).__name__) from None
        self._current = red

    def collate(self, encs: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """Left-padded batch of per-request inputs (re-run the processor when shapes differ)."""
        if len(encs) == 1:
            return dict(encs[0].inputs)
        keys = set(encs[0].inputs)
        same = all(set(e.inputs) == keys for e in encs) and all(
            len({e.inputs[k].shape[1:] for e in encs}) == 1 for k in keys if k not in ("input_ids", "attention_mask")
        )
        if not same:
            reqs = [e.request for e in encs]
            with self._proc_lock:
                inputs = self.processor(
                    images=[im for r in reqs for im in r.images], text=[r.prompt for r in reqs],
                    return_tensors="pt", padding=True,
                )  # fmt: skip
            return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        width = max(e.prompt_tokens for e in encs)
        out: dict[str, torch.Tensor] = {}
        for k in keys:
            if k in ("input_ids", "attention_mask"):
                fill = self.pad_id if k == "input_ids" else 0
                rows = [torch.nn.functional.pad(e.inputs[k], (width - e.prompt_tokens, 0), value=fill) for e in encs]
            else:
                rows = [e.inputs[k] for e in encs]
            out[k] = torch.cat(rows, 0)
        return out

    def generate(
        self, red: Reduction, sampling: tuple[float, float, bool], encs: Sequence[Encoded], sinks: Sequence[RowSink]
    ):
        """Run one batch to the end, streaming each row into its sink; raises only for engine
        failures (the scheduler answers them)."""
        self._apply(red)
        inputs = self.collate(encs)
        rows = [_Row(s, e) for s, e in zip(sinks, encs)]
        streamer = _Streamer(self, rows)
        temperature, top_p, ignore_eos = sampling
        kwargs: dict[str, Any] = {"do_sample": False}  # sampling: _RowSampler draws, the greedy step takes it
        if temperature > 0:
            gens = [_generator(e.request.seed) for e in encs]
            kwargs["logits_processor"] = LogitsProcessorList([_RowSampler(temperature, top_p, gens)])
        if ignore_eos:  # no EOS before the longest row's max_tokens; shorter rows stop in _RowsDone
            kwargs["min_new_tokens"] = max(e.max_tokens for e in encs)
        with torch.inference_mode():
            self.model.generate(
                **inputs,
                max_new_tokens=max(e.max_tokens for e in encs),
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_ids,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]),
                **kwargs,
            )
        for row in rows:  # rows cut by the batch's max_new_tokens, or whose client went away
            if not row.finished:
                streamer.finish(row, "length")

    def usage_ext(self, row_index: int, enc: Encoded) -> dict[str, Any]:
        """The ``usage.tokenprune`` extension of one row, read from the last prefill's trace."""
        red = self._current or Reduction(None, None)
        ext: dict[str, Any] = {"method": red.method or "none", "budget": red.budget}
        if red.params:
            ext["params"] = _thaw(red.params)
        trace = self._handle.trace if self._handle is not None else None
        if trace is None or red.method is None:
            ext.update(visual_tokens=enc.visual_tokens, kept_visual_tokens=enc.visual_tokens, realized_budget=1.0)
            if enc.return_kept:
                ext["kept"] = list(range(enc.visual_tokens))
            return ext
        i = row_index
        unpruned = int(trace.unpruned[i])
        entering = [int(trace.tokens_entering(j)[i]) for j in range(trace.num_layers)]
        kept = int(trace.stages[-1].counts[i]) if trace.stages else unpruned
        denom = unpruned * trace.num_layers
        ext.update(
            visual_tokens=unpruned,
            kept_visual_tokens=kept,
            realized_budget=round(sum(entering) / denom, 6) if denom else 1.0,
            visual_tokens_per_layer=entering,
        )
        if enc.return_kept:
            row = trace.stages[-1].kept[i] if trace.stages else torch.arange(unpruned)
            ext["kept"] = row[row >= 0].tolist()
        return ext


def _generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (a fresh random seed when None)."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


class _RowSampler(LogitsProcessor):
    """OpenAI-style sampling (temperature, then top-p) with one CPU ``torch.Generator`` per row, so a
    row's draws depend on its own seed only, never on the batch it shares. Returns scores that keep
    only the drawn token; ``generate``'s greedy step then takes it."""

    def __init__(self, temperature: float, top_p: float, generators: Sequence[torch.Generator]) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.generators = generators

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = (scores.float() / self.temperature).softmax(-1).cpu()
        if self.top_p < 1.0:  # the smallest set of most likely tokens whose mass reaches top_p
            top, order = probs.sort(-1, descending=True)
            top = top.masked_fill(top.cumsum(-1) - top >= self.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, top)
        drawn = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        return torch.full_like(scores, float("-inf")).scatter(-1, drawn.to(scores.device), 0.0)


class _RowsDone(StoppingCriteria):
    """Per-row stop: rows whose sink finished (EOS, max_tokens, stop string, client gone)."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        for row in self.rows:
            if not row.done and row.sink.cancelled:
                row.done = True
        return torch.tensor([r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)


class _Streamer(BaseStreamer):
    """Receives each step's tokens (B,) from ``generate`` and feeds every row's sink."""

    def __init__(self, runner: ModelRunner, rows: list[_Row]) -> None:
        self.runner = runner
        self.rows = rows
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        for i, (row, tok) in enumerate(zip(self.rows, tokens)):
            if row.done:
                continue
            if row.usage_ext is None:  # first token: the prefill (and its trace) is complete
                row.usage_ext = self.runner.usage_ext(i, row.enc)
                row.sink.on_first_token()
            if tok in self.runner.eos_ids:
                self.finish(row, "stop")
                continue
            row.ids.append(tok)
            self._emit(row)

    def _emit(self, row: _Row) -> None:
        text = self.runner.decoder.decode(row.ids, skip_special_tokens=True)
        for s in row.enc.stop:
            at = text.find(s)
            if at >= 0:
                self._send(row, text[:at])
                self.finish(row, "stop", flushed=True)
                return
        if len(row.ids) >= row.enc.max_tokens:
            self._send(row, text)
            self.finish(row, "length", flushed=True)
            return
        hold = max((len(s) - 1 for s in row.enc.stop), default=0)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            hold = max(hold, 1)
        self._send(row, text[: len(text) - hold] if hold else text)

    def _send(self, row: _Row, text: str) -> None:
        if len(text) > len(row.sent) and text.startswith(row.sent):
            row.sink.on_delta(text[len(row.sent) :])
            row.sent = text

    def finish(self, row: _Row, reason: str, flushed: bool = False) -> None:
        """Flush what is held back and hand the row's result to its sink."""
        if row.finished:
            return
        if not flushed:
            text = self.runner.decoder.decode(row.ids, skip_special_tokens=True)
            self._send(row, text.rstrip("\ufffd"))
        row.done = row.finished = True
        if row.usage_ext is None:
            row.usage_ext = self.runner.usage_ext(self.rows.index(row), row.enc)
        row.sink.on_done(
            {
                "text": row.sent,
                "finish_reason": reason,
                "prompt_tokens": row.enc.prompt_tokens,
                "completion_tokens": len(row.ids),
                "tokenprune": row.usage_ext,
                "finished_at": time.perf_counter(),
            }
        )

    def end(self) -> None:
        """Called by ``generate`` at the end; rows are finished by :meth:`ModelRunner.generate`."""


def _uses_budget(method: str, params: tuple[tuple[str, Any], ...]) -> bool:
    """Whether ``method`` with ``params`` takes a budget (invalid ones: left to ``validate``)."""
    try:
        return api.method(method, **_thaw(params)).uses_budget
    except (TokenPruneError, ValueError, TypeError):
        return True


def _thaw(params: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params}


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return [-1]
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]
