"""Invariant 5: a left-padded batch gives the same tokens and kept sets as each sample alone,
including LLaVA-NeXT batches whose rows carry different numbers of visual tokens."""

import pytest
import tiny
import torch

import tokenprune

CASES = [
    ("llava", "random", {}),
    ("llava", "uniform", {}),
    ("llava", "fastv", {}),
    ("llava", "random", {"site": "llm", "layer": 3}),
    ("llava_next", "random", {}),
    ("llava_next", "uniform", {}),
    ("llava_next", "fastv", {}),
    ("llava_next", "uniform", {"site": "llm"}),
]
SIZES = {"llava": ((40, 48), (32, 32)), "llava_next": ((40, 70), (64, 32))}
PROMPTS = ["USER: <image>\nwhat is shown in the picture? ASSISTANT:", "USER: <image>\nit? ASSISTANT:"]


@pytest.fixture(scope="module")
def models():
    return {"llava": tiny.llava(), "llava_next": tiny.llava_next()}


@pytest.mark.parametrize("kind,method,params", CASES)
def test_batch_equals_single(models, kind, method, params):
    model, proc = models[kind]
    inputs = tiny.batch(proc, SIZES[kind], PROMPTS)
    assert inputs["attention_mask"][:, 0].min() == 0  # left padding present
    n_visual = (inputs["input_ids"] == model.config.image_token_id).sum(-1)
    if kind == "llava_next":
        assert n_visual[0] != n_visual[1]  # rows carry different numbers of visual tokens
    n_prompt = inputs["input_ids"].shape[1]
    with tokenprune.patch(model, method, budget=0.4, **params) as handle:
        together = tiny.greedy(model, inputs)[:, n_prompt:]
        kept = handle.trace.stages[-1].kept
        for i in range(2):
            alone_inputs = tiny.single(proc, i, SIZES[kind], PROMPTS)
            alone = tiny.greedy(model, alone_inputs)[:, alone_inputs["input_ids"].shape[1] :]
            assert torch.equal(together[i], alone[0]), (method, i)
            kept_alone = handle.trace.stages[-1].kept[0]
            assert kept[i][kept[i] >= 0].tolist() == kept_alone.tolist()
