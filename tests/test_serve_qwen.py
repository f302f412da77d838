"""tokenprune serve on Qwen2.5-VL (in process: the runner the server's worker drives): prompts rendered in the
model's own format (the bundled fixture's ``USER: <|vision_start|><|image_pad|><|vision_end|>...``, or a real
checkpoint's chat template), its image token refused in user text, and answers / kept sets of a batch of
requests (square and wide images, different prompt lengths) equal to each request run alone through
``tokenprune.patch`` + ``generate``."""

from __future__ import annotations

import base64
import io
import re

import pytest
import tiny

from tokenprune import demo

pytest.importorskip("fastapi")

from tokenprune.serve.errors import APIError  # noqa: E402
from tokenprune.serve.model import ModelRunner, load_model  # noqa: E402
from tokenprune.serve.protocol import Limits, Reduction, parse_chat, render_messages  # noqa: E402

# a chat template in the style of a real checkpoint's (roles, image block, generation prompt), in words the
# fixture's tokenizer knows (it has no <|im_start|>: unknown words would not encode)
CHAT = ("{% for m in messages %}{{ m.role }}: {% for c in m.content %}{% if c.type == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>\n{% else %}{{ c.text }}{% endif %}{% endfor %} {% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")


def body(image, question: str, **extra) -> dict:
    png = io.BytesIO()
    image.save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    return {"model": "qwen", "max_tokens": 12, **extra, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]}


class Sink:
    cancelled = False

    def on_first_token(self) -> None: ...

    def on_delta(self, text: str) -> None: ...

    def on_done(self, result: dict) -> None:
        self.result = result


@pytest.fixture(scope="module")
def qwen():
    model, proc = load_model("qwen2_5_vl")
    return model, proc, ModelRunner(model, proc, Reduction("divprune", 0.5), Limits(), "qwen")


def test_bundled_qwen_prompt_is_the_fixture_prompt_and_reserves_its_image_token(qwen):
    _, _, runner = qwen
    ex = demo.fixture_shapes("qwen2_5_vl", "test", 1)[0]
    req = parse_chat(body(ex["image"], ex["question"]), Limits(), runner.prompt_format)
    assert req.prompt == demo.prompt(ex["question"], "qwen2_5_vl")
    for token in ("<|image_pad|>", "<image>"):
        with pytest.raises(APIError, match="may not contain") as err:
            parse_chat(body(ex["image"], f"what is {token}?"), Limits(), runner.prompt_format)
        assert err.value.status == 400


def test_batched_requests_equal_each_request_alone(qwen):
    model, proc, runner = qwen
    examples = demo.fixture_shapes("qwen2_5_vl", "test", 6)
    picked = [examples[0], examples[4]]  # a square and a wide image, different questions (prompt lengths)
    assert picked[0]["image"].size != picked[1]["image"].size
    for red in (Reduction("divprune", 0.5), Reduction(None, None)):
        reqs = [parse_chat(body(ex["image"], ex["question"], tokenprune={"return_kept": True}), Limits(),
                           runner.prompt_format) for ex in picked]
        encs = [runner.encode(r) for r in reqs]
        assert [e.visual_tokens for e in encs] == [144, 150]
        sinks = [Sink(), Sink()]
        runner.generate(red, (0.0, 1.0, False), encs, sinks)
        for ex, sink in zip(picked, sinks, strict=True):
            text, kept, _ = tiny.greedy_alone(model, proc, ex["image"], demo.prompt(ex["question"], "qwen2_5_vl"),
                                              red.method, red.budget, 12)
            assert sink.result["text"] == text
            ext = sink.result["tokenprune"]
            assert ext["kept"] == (kept if kept is not None else list(range(ext["visual_tokens"])))
            assert ext["kept_visual_tokens"] == (round(0.5 * ext["visual_tokens"]) if red.method else
                                                 ext["visual_tokens"])


def test_a_chat_template_renders_real_checkpoint_prompts(qwen):
    """A processor with a chat template (as real Qwen2.5-VL checkpoints have) renders through it: roles, the
    image block where the image was, the generation prompt; the image token stays reserved."""
    model, proc, _ = qwen
    chat_proc = type(proc)(image_processor=proc.image_processor, tokenizer=proc.tokenizer, chat_template=CHAT)
    runner = ModelRunner(model, chat_proc, Reduction(None, None), Limits(), "qwen")
    ex = demo.fixture_shapes("qwen2_5_vl", "test", 1)[0]
    messages = body(ex["image"], ex["question"])["messages"]
    prompt, images = render_messages([{"role": "system", "content": "Be brief."}, *messages], Limits(),
                                      runner.prompt_format)
    assert prompt == f"system: Be brief. user: <|vision_start|><|image_pad|><|vision_end|>\n{ex['question']} assistant:"
    req = parse_chat(body(ex["image"], ex["question"]), Limits(), runner.prompt_format)
    assert runner.encode(req).visual_tokens == 144 and len(images) == 1
    with pytest.raises(APIError, match=re.escape("may not contain '<|image_pad|>'")):
        parse_chat(body(ex["image"], "<|image_pad|>"), Limits(), runner.prompt_format)
