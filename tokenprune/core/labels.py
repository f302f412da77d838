"""Training-style calls, ``model(**inputs, labels=...)``: pruning shortens the sequence the LLM
sees, so its logits are shorter than ``input_ids``. A pre-hook on the model takes ``labels`` out of
the call; a post-hook gathers them through the forward's column maps (pre-LLM compaction, then the
last LLM-site stage; dropped columns are never targets) and computes the model's own loss on the
kept sequence. Nothing is pruned: budget 1.0 gives the unpatched loss exactly."""

from __future__ import annotations

import inspect

from .hooks import HookSet
from .masks import compose, gather_cols
from .state import ForwardState

IGNORE = -100  # transformers' ignore_index


def kept_columns(state: ForwardState):
    """(B, L_out) original column of each logit of the last forward, -1 for fillers; None if unchanged."""
    cols = state.prompt.cols if state.prompt is not None else None
    if state.llm_stages:
        cols = compose(cols, state.llm_stages[-1].cols)
    return cols


def install_labels(model, state: ForwardState, hooks: HookSet) -> None:
    """Compute ``loss`` over the kept sequence when ``model``'s forward takes ``labels``."""
    if "labels" not in inspect.signature(model.forward).parameters or not hasattr(model, "loss_function"):
        return

    def take(mod, kw):
        state.labels = kw.get("labels")
        if state.labels is None:
            return None
        kw["labels"] = None
        return kw

    def loss(mod, kw, out):
        labels, state.labels = state.labels, None
        if labels is None:
            return None
        cols = kept_columns(state)
        if cols is not None:
            labels = gather_cols(labels, cols.to(labels.device), fill=IGNORE)
        extra = {"num_items_in_batch": kw["num_items_in_batch"]} if kw.get("num_items_in_batch") is not None else {}
        logits = out["logits"] if isinstance(out, dict) else out[0]
        value = mod.loss_function(
            logits=logits, labels=labels, vocab_size=mod.config.get_text_config().vocab_size, **extra
        )
        if isinstance(out, tuple):
            return (value, *out)
        return type(out)(loss=value, **{k: v for k, v in out.items() if k != "loss"})

    hooks.pre(model, take)
    hooks.post(model, loss)
