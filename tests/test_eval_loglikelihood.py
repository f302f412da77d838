"""The harness adapters' log-likelihood under pruning (lm-eval / lmms-eval multiple-choice scoring):
exact at budget 1.0, and below it equal to references computed without the adapter's position logic."""

from __future__ import annotations

import eval_helpers
import pytest
import tiny
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tokenprune
from integrations.common import PrunedVLM

CONTEXT, CONTINUATION = "what is shown in the picture?", " a red square on a blue background."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return eval_helpers.save_tiny(tmp_path_factory.mktemp("tiny_ll") / "llava")


@pytest.fixture(scope="module")
def image():
    return eval_helpers.images(1)[0]


@pytest.fixture(scope="module")
def unpruned(tiny_dir, image):
    return PrunedVLM(str(tiny_dir)).loglikelihood(CONTEXT, CONTINUATION, [image])


@pytest.mark.parametrize("method", ["random", "fastv", "hired", "pdrop"])
def test_full_budget_equals_unpatched(tiny_dir, image, unpruned, method):
    vlm = PrunedVLM(str(tiny_dir), method=method, budget=1.0)
    assert vlm.loglikelihood(CONTEXT, CONTINUATION, [image]) == unpruned


def _continuation_logprob(logits: torch.Tensor, target: torch.Tensor) -> float:
    pred = logits[-target.numel() - 1 : -1].float().log_softmax(-1)
    return float(pred.gather(-1, target[:, None]).sum())


def test_pre_llm_pruning_equals_explicitly_pruned_sequence(tiny_dir, image, unpruned):
    vlm = PrunedVLM(str(tiny_dir), method="random", budget=0.5)
    got, _ = vlm.loglikelihood(CONTEXT, CONTINUATION, [image])
    kept = vlm.handle.trace.stage("random").kept[0]
    assert 0 < kept.numel() < vlm.handle.trace.unpruned[0]
    vlm.handle.remove()
    # reference: the unpatched model on the prompt + continuation with only the kept visual tokens, original positions
    full = vlm._inputs(CONTEXT, [image], extra=CONTINUATION)
    n_ctx = vlm._inputs(CONTEXT, [image])["input_ids"].shape[1]
    ids = full["input_ids"][0]
    img_cols = (ids == vlm.model.config.image_token_id).nonzero().flatten()
    keep_cols = torch.cat([(ids != vlm.model.config.image_token_id).nonzero().flatten(), img_cols[kept]]).sort().values
    with torch.no_grad():
        feats = vlm.model.model.get_image_features(pixel_values=full["pixel_values"], return_dict=True).pooler_output[0]
        logits = vlm.model(
            input_ids=ids[keep_cols][None],
            position_ids=keep_cols[None],
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[feats[kept]])},
        ).logits[0]
    assert got == pytest.approx(_continuation_logprob(logits, ids[n_ctx:]), abs=1e-4)
    assert got != pytest.approx(unpruned[0], abs=1e-4)  # pruning really changed the score


def test_llm_site_pruning_equals_cached_decoding_of_the_continuation(tiny_dir, image):
    """A text-independent LLM-site selection (fixed kept set from layer 3): one forward over prompt +
    continuation equals pruning the prompt in prefill and decoding the continuation token by token."""
    vlm = PrunedVLM(str(tiny_dir))
    vlm.handle = tokenprune.patch(vlm.model, tiny.Fixed(kept=((0, 2, 3, 7, 8, 15),)))
    got, greedy = vlm.loglikelihood(CONTEXT, CONTINUATION, [image])
    full = vlm._inputs(CONTEXT, [image], extra=CONTINUATION)
    n_ctx = vlm._inputs(CONTEXT, [image])["input_ids"].shape[1]
    ids = full["input_ids"][0]
    with torch.no_grad():
        out = vlm.model(input_ids=ids[None, :n_ctx], pixel_values=full["pixel_values"], use_cache=True)
        steps, cache = [out.logits[0, -1]], out.past_key_values
        for t in range(n_ctx, ids.numel() - 1):
            out = vlm.model(input_ids=ids[None, t : t + 1], attention_mask=torch.ones(1, t + 1, dtype=torch.long),
                            past_key_values=cache, use_cache=True)
            steps.append(out.logits[0, -1])
            cache = out.past_key_values
    pred = torch.stack(steps).float().log_softmax(-1)
    target = ids[n_ctx:]
    assert vlm.handle.trace.stage("fixed").counts.tolist() == [6]
    assert got == pytest.approx(float(pred.gather(-1, target[:, None]).sum()), abs=1e-4)
    assert greedy == bool((pred.argmax(-1) == target).all())


def test_below_full_budget_every_method_scores(tiny_dir, image):
    """Multiple-choice scoring runs at a pruning budget for methods at every site (it crashed before)."""
    for method in ("fastv", "pdrop", "hired", "visionzip", "tome"):
        vlm = PrunedVLM(str(tiny_dir), method=method, budget=0.5)
        scores = [vlm.loglikelihood(CONTEXT, c, [image])[0] for c in (" a cat.", " a dog.")]
        assert all(s < 0 for s in scores) and vlm.handle.trace.realized_budget < 1.0, method

