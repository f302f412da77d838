"""LLaVA-OneVision (issue #18): SigLIP tower without CLS, anyres tiles (none for multi-image
samples), pooled video frames with a trailing newline token; tiny random-weight model."""

import re

import pytest
import tiny
import torch

import tokenprune
from tokenprune.errors import SiteError, TokenPruneError
from tokenprune.methods import REGISTRY

SERVED = {"random", "uniform", "fastv", "pdrop", "feather", "hired", "visionzip", "early_exit"}
FULL = {"early_exit": {"threshold": None}}  # full-budget settings of methods that take no budget
A, B = tiny.QWEN_PROMPTS[0].split("{}"), tiny.QWEN_PROMPTS[1].split("{}")
SAMPLES = {
    "sizes": [[A[0], ("image", (40, 70)), A[1]], [B[0], ("image", (64, 32)), B[1]]],  # anyres tiles, 52 / 44 tokens
    "two_images": [[A[0], ("image", (40, 40)), " and ", ("image", (32, 48)), A[1]], [B[0], ("image", (32, 32)), B[1]]],
    "video": [[A[0], ("video", (3, 32, 32)), A[1]], [B[0], ("image", (48, 32)), B[1]]],
}


@pytest.fixture(scope="module")
def model():
    return tiny.llava_onevision()


def test_every_method_is_exact_at_full_budget_or_refused(model):
    inputs = tiny.onevision_inputs(model, SAMPLES["sizes"])
    ref_tokens, ref_logits = tiny.generate_logits(model, inputs)
    served = set()
    for name in sorted(REGISTRY):
        try:
            handle = tokenprune.patch(model, name, **FULL.get(name, {"budget": 1.0}))
        except TokenPruneError as err:
            assert name not in SERVED, (name, err)
            assert re.match(r"^[a-z_]+: ", str(err)), err
            continue
        with handle:
            tokens, logits = tiny.generate_logits(model, inputs)
            assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits), name
            assert handle.trace.realized_budget == 1.0, name
        served.add(name)
    assert SERVED <= served
    tokens, logits = tiny.generate_logits(model, inputs)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)  # removed exactly


CASES = [(m, k) for m in ("random", "uniform", "fastv", "hired") for k in sorted(SAMPLES)
         if (m, k) != ("hired", "video")]  # encoder scores are read for images only (test_encoder_scores_refuse_video)


@pytest.mark.parametrize("method,kind", CASES)
def test_batch_equals_samples_alone(model, kind, method):
    params = {}
    inputs = tiny.onevision_inputs(model, SAMPLES[kind])
    with tokenprune.patch(model, method, budget=0.5, **params) as handle:
        tokens, logits = tiny.generate_logits(model, inputs)
        kept = handle.trace.stages[-1].kept
        for b in range(2):
            alone = tiny.onevision_inputs(model, SAMPLES[kind][b: b + 1])
            alone_tokens, alone_logits = tiny.generate_logits(model, alone)
            assert torch.equal(tokens[b: b + 1], alone_tokens), (b, kind)
            assert torch.allclose(logits[b: b + 1], alone_logits, atol=1e-4), (b, kind)
            one = handle.trace.stages[-1].kept[0]
            assert torch.equal(one[one >= 0], kept[b][kept[b] >= 0]), (b, kind)


def test_video_frames_and_newline_are_laid_out(model):
    inputs = tiny.onevision_inputs(model, SAMPLES["video"])
    with tokenprune.patch(model, "uniform", budget=0.5) as handle, torch.no_grad():
        model(**inputs)
    meta = handle.trace.meta
    assert meta["frame"][0, :13].tolist() == [0] * 4 + [1] * 4 + [2] * 5  # 3 frames of 2x2 pooled units + newline
    assert meta["tile"][0, 12] == -1
    kept = handle.trace.stage("uniform").kept[0]
    kept = kept[kept >= 0]
    assert kept.numel() == round(0.5 * 13)
    assert torch.bincount(meta["frame"][0][kept], minlength=3)[:2].tolist() == [2, 2]  # even per frame


def test_encoder_scores_refuse_video(model):
    inputs = tiny.onevision_inputs(model, SAMPLES["video"])
    with tokenprune.patch(model, "hired", budget=0.5), pytest.raises(SiteError, match="images"), torch.no_grad():
        model(**inputs)


def test_hired_reads_received_attention_without_cls(model):
    """No CLS token: HiRED ranks by the attention each patch receives (mean over queries, summed
    over heads) at the feature layer; with the base view and tiles of one image, the base view's
    share is the top by that score."""
    inputs = tiny.onevision_inputs(model, SAMPLES["sizes"][:1])
    captured = {}
    layer = model.model.vision_tower.encoder.layers[2]
    def keep_weights(module, args, out):
        captured.setdefault("w", out[1])

    hook = layer.self_attn.register_forward_hook(keep_weights)
    impl = model.model.vision_tower.config._attn_implementation
    model.model.vision_tower.set_attn_implementation("eager")
    try:
        with tokenprune.patch(model, "hired", budget=0.4) as handle, torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
        model.model.vision_tower.set_attn_implementation(impl)
    received = captured["w"][0].float().mean(1).sum(0)  # base crop (tower row 0): (16,)
    kept = handle.trace.stage("hired").kept[0]
    base = kept[kept < 16]
    assert base.numel() == int(round(0.4 * 52) * 0.5)  # alpha = 0.5 of the image's total
    assert torch.equal(base, received.topk(base.numel()).indices.sort().values)


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("method", ["random", "uniform", "hired", "visionzip", "fastv"])
def test_realized_budget(budget, method):
    model = tiny.llava_onevision(layers=16)
    inputs = tiny.onevision_inputs(model, SAMPLES["sizes"])
    with tokenprune.patch(model, method, budget=budget) as handle, torch.no_grad():
        model(**inputs)
    n = handle.trace.unpruned.tolist()
    assert abs(handle.trace.realized_budget - budget) <= max(0.02, 1 / min(n)), handle.trace.realized_budget


def test_vision_site_is_refused(model):
    with pytest.raises(SiteError, match="OneVision"):
        tokenprune.patch(model, "tome", budget=0.5)
