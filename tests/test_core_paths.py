"""The generate() paths users take beyond one plain call: concurrent threads, copies, beams,
chat continuation from a cache, chunked prefill, static caches, labels, cache-free calls and
nested patches. Each is exact (budget 1.0 = unpatched, below = the explicit reference) or refused
with a typed error."""

import copy
import threading

import pytest
import tiny
import torch

import tokenprune
from tokenprune.core.state import cache_of

PROMPTS = [
    "USER: <image>\nwhat is shown in the picture? ASSISTANT:",
    "USER: <image>\ndescribe it. ASSISTANT:",
    "USER: <image>\nwhat is it? ASSISTANT:",
    "USER: <image>\nthe cat and the dog? ASSISTANT:",
]


@pytest.fixture(scope="module")
def llava():
    return tiny.llava()


def _request(proc, i: int):
    return proc(images=[tiny.image(32 + 4 * (i % 3), 40, 10 + i)], text=[PROMPTS[i % 4]], return_tensors="pt")


def _run(model, inputs, handle=None, n: int = 4):
    tokens, logits = tiny.generate_logits(model, inputs, n)
    return tokens, logits, (handle.trace.stages[-1].kept[0].tolist() if handle is not None else None)


def _concurrently(fn, n: int) -> list:
    """fn(0..n-1) in n threads released together; re-raises the first error."""
    results, errors = [None] * n, []
    barrier = threading.Barrier(n)

    def work(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("method", ["hired", "fastv"])
def test_concurrent_generate_equals_sequential(llava, method):
    """8 threads x 3 rounds on one patched model: every answer, logit and trace equals the
    sequential run (per-forward state is per thread; handle.trace is the calling thread's)."""
    model, proc = llava
    requests = [_request(proc, i) for i in range(8)]
    with tokenprune.patch(model, method, budget=0.4) as handle:
        sequential = [_run(model, r, handle) for r in requests]
        assert len({tuple(s[2]) for s in sequential}) > 1  # the requests keep different tokens
        for _ in range(3):
            results = _concurrently(lambda i: _run(model, requests[i], handle), 8)
            for (tok, logits, kept), (tok_s, logits_s, kept_s) in zip(results, sequential):
                assert torch.equal(tok, tok_s)
                assert torch.equal(logits, logits_s)
                assert kept == kept_s


BEAM_CASES = [
    ("llava", "hired"),
    ("llava", "visionzip"),
    ("llava", "tome"),
    ("llava", "fastv"),
    ("llava_next", "hired"),
    ("llava_next", "random"),
    ("llava_next", "pdrop"),
]
SIZES = {"llava": ((40, 48), (32, 32)), "llava_next": ((40, 70), (64, 32))}


@pytest.fixture(scope="module")
def llava_next():
    return tiny.llava_next()


@pytest.mark.parametrize("kind,method", BEAM_CASES)
def test_beams_and_return_sequences(llava, llava_next, kind, method):
    """generate() repeats the encoded images per beam / returned sequence: exact at budget 1.0;
    below it every repeated row keeps its sample's tokens and starts from its sample's logits."""
    model, proc = llava if kind == "llava" else llava_next
    inputs = tiny.batch(proc, SIZES[kind])
    n = inputs["input_ids"].shape[1]
    beams = dict(num_beams=2, num_return_sequences=2, max_new_tokens=3, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(**inputs, **beams).sequences
        with tokenprune.patch(model, method, budget=1.0):
            assert torch.equal(model.generate(**inputs, **beams).sequences, ref)
        torch.manual_seed(0)
        sampled_ref = model.generate(**inputs, do_sample=True, num_return_sequences=2, max_new_tokens=3)
        with tokenprune.patch(model, method, budget=1.0):
            torch.manual_seed(0)
            sampled = model.generate(**inputs, do_sample=True, num_return_sequences=2, max_new_tokens=3)
        assert torch.equal(sampled, sampled_ref)
        with tokenprune.patch(model, method, budget=0.6) as handle:
            _, logits, _ = _run(model, inputs, n=1)
            kept = handle.trace.stages[-1].kept
            out = model.generate(**inputs, **beams, output_logits=True)
            kept_beams = handle.trace.stages[-1].kept
    assert out.sequences.shape == (4, n + 3)
    assert torch.equal(kept_beams, kept.repeat_interleave(2, 0))
    torch.testing.assert_close(out.logits[0], logits[:, 0].repeat_interleave(2, 0))


@pytest.mark.parametrize("site", ["pre_llm", "llm"])
def test_chat_turn_from_cache_equals_fresh_full_prompt(llava, site):
    """Turn 2 continues turn 1's KV cache (another request runs in between): its answer equals a
    fresh generation of the whole conversation that keeps the same visual tokens."""
    model, proc = llava
    turn1 = _request(proc, 0)
    kept = [0, 3, 5, 6, 9, 12, 15]
    method = tiny.Fixed(kept=(kept,), site=site)
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with tokenprune.patch(model, method), torch.no_grad():
        out1 = model.generate(**turn1, **gen, return_dict_in_generate=True)
        model.generate(**_request(proc, 5), **gen)  # an unrelated request on the same patch
        more = proc.tokenizer(" USER: and the dog? ASSISTANT:", return_tensors="pt")["input_ids"]
        ids = torch.cat([out1.sequences, more], 1)
        am = torch.ones_like(ids)
        gen.update(return_dict_in_generate=True, output_logits=True)
        turn2 = model.generate(input_ids=ids, attention_mask=am, past_key_values=cache_of(out1), **gen)
        fresh = model.generate(input_ids=ids, attention_mask=am, pixel_values=turn1["pixel_values"], **gen)
    assert torch.equal(turn2.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(turn2.logits), torch.stack(fresh.logits))


def test_static_cache_and_chunked_prefill_are_refused(llava):
    """Static caches and chunked prefill are refused before anything runs, by generate() and by
    the first hook of a forward (a caller that builds the StaticCache itself)."""
    from transformers import StaticCache

    model, proc = llava
    inputs = tiny.batch(proc)
    with tokenprune.patch(model, "fastv", budget=0.5), torch.no_grad():
        with pytest.raises(tokenprune.errors.UnsupportedPathError, match="cache_implementation"):
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
        with pytest.raises(tokenprune.errors.UnsupportedPathError, match="prefill_chunk_size"):
            model.generate(**inputs, max_new_tokens=2, prefill_chunk_size=8)
        cache = StaticCache(config=model.config.get_text_config(), max_cache_len=128)
        with pytest.raises(tokenprune.errors.UnsupportedPathError, match="cache_implementation"):
            model(**inputs, past_key_values=cache)
    with torch.no_grad():  # unpatched, both run
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


@pytest.mark.parametrize("method", ["random", "hired"])
def test_cache_free_call_without_mask_equals_masked_call(llava, method):
    """use_cache=False and no attention_mask: the compacted prompt's position ids have gaps, which
    must not read as packed sequences; logits equal the call with an explicit mask."""
    model, proc = llava
    inputs = _request(proc, 1)
    with tokenprune.patch(model, method, budget=0.4, **({"seed": 1} if method == "random" else {})):
        with torch.no_grad():
            masked = model(**inputs, use_cache=False).logits
            bare = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], use_cache=False).logits
    assert masked.shape[1] < inputs["input_ids"].shape[1]
    torch.testing.assert_close(bare, masked)


def test_trace_follows_the_last_request(llava):
    """A text-only request after an image request leaves no trace of the image request."""
    model, proc = llava
    with tokenprune.patch(model, "random", budget=0.5) as handle, torch.no_grad():
        model.generate(**_request(proc, 0), max_new_tokens=2)
        assert handle.trace is not None
        text = proc.tokenizer(["USER: hello ASSISTANT:"], return_tensors="pt")
        model.generate(**text, max_new_tokens=2)
        assert handle.trace is None


def test_deepcopy_carries_an_independent_patch(llava):
    """The copy of a patched model has its own equivalent patch: zeroing the copy's tower changes
    only the copy; unpatching the copy leaves the original's patch active and working."""
    model, proc = llava
    inputs = _request(proc, 2)
    with torch.no_grad():
        plain = model(**inputs).logits
        handle = tokenprune.patch(model, "hired", budget=0.4)
        try:
            before = model(**inputs).logits
            clone = copy.deepcopy(model)
            twin = tokenprune.handle_of(clone)
            assert twin is not None and twin is not handle and twin.active and twin.method.name == "hired"
            torch.testing.assert_close(clone(**inputs).logits, before, rtol=0, atol=0)
            assert twin.trace.stages[-1].kept.tolist() == handle.trace.stages[-1].kept.tolist()
            for p in clone.model.vision_tower.parameters():
                p.zero_()
            assert not torch.equal(clone(**inputs).logits, before)
            assert torch.equal(model(**inputs).logits, before)
            tokenprune.unpatch(clone)
            assert not twin.active and handle.active
            assert torch.equal(model(**inputs).logits, before)
            assert "get_image_features" in vars(model.model) and "get_image_features" not in vars(clone.model)
        finally:
            handle.remove()
        assert torch.equal(model(**inputs).logits, plain)


def test_pickling_a_patched_model_is_refused_with_a_hint(llava, tmp_path):
    model, _ = llava
    with tokenprune.patch(model, "fastv", budget=0.5):
        with pytest.raises(tokenprune.errors.PatchedModelError, match="state_dict"):
            torch.save(model, tmp_path / "m.pt")
        torch.save(model.state_dict(), tmp_path / "m.pt")  # what the message suggests works while patched


def test_nested_patches_are_refused(llava):
    model, _ = llava
    with tokenprune.patch(model, "fastv", budget=0.5) as outer:
        with pytest.raises(tokenprune.errors.PatchedModelError, match="already patched"):
            tokenprune.patch(model.model, "random", budget=0.5)
        assert outer.active
    with tokenprune.patch(model.model, "random", budget=0.5):
        with pytest.raises(tokenprune.errors.PatchedModelError, match="inside this"):
            tokenprune.patch(model, "fastv", budget=0.5)


@pytest.mark.parametrize("method,budget", [("random", 1.0), ("random", 0.4), ("fastv", 0.4)])
def test_labels_give_the_loss_over_the_kept_sequence(llava, method, budget):
    """model(**inputs, labels=...) under pruning: the loss is the model's loss over the kept
    columns (labels gathered like input_ids); at budget 1.0 the unpatched loss exactly."""
    model, proc = llava
    inputs = tiny.batch(proc)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        plain = model(**inputs, labels=labels).loss
        with tokenprune.patch(model, method, budget=budget, **({"seed": 2} if method == "random" else {})) as h:
            out = model(**inputs, labels=labels)
            logits = model(**inputs).logits
            cols = h.kept_columns
    if budget == 1.0:
        assert torch.equal(out.loss, plain)
        return
    assert logits.shape[1] < labels.shape[1] and cols.shape == logits.shape[:2]
    kept = torch.gather(labels, 1, cols.clamp(min=0)).masked_fill(cols < 0, -100)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), kept[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
