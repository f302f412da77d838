"""tokenprune serve: a real server process on a free loopback port, driven by the official ``openai``
client (plain, streaming, per-request override, usage extension, metrics), raw HTTP for malformed
input, batched-vs-alone equality of per-request traces, and a bounded load test.

The server runs the bundled LLaVA fixture when its checkpoint is installed, otherwise a tiny LLaVA
saved with ``save_pretrained``. Skipped without fastapi/uvicorn; the client tests also need openai.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import socket
import time
import urllib.request

import pytest
import tiny
from server_process import serve_process

import tokenprune
from tokenprune import demo

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tokenprune.serve.protocol import Limits, parse_chat, render_messages  # noqa: E402

MAX_PIXELS = 250_000
MAX_BODY = 2_000_000
BODY_TIMEOUT = 5
QUESTION = "What color is the triangle?"


def data_url(img, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user(url: str | list[str], text: str = QUESTION) -> list[dict]:
    urls = [url] if isinstance(url, str) else url
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def bundled() -> bool:
    return (demo.checkpoint_path("llava") / "config.json").is_file()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """``"llava"`` (bundled) when installed, else a tiny LLaVA folder."""
    if bundled():
        return "llava"
    path = tmp_path_factory.mktemp("tiny_llava")
    model, proc = tiny.llava()
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """A ``python -m tokenprune.serve`` process; yields its base URL and model name."""
    args = [
        "--model", model_dir, "--method", "pdrop", "--budget", "0.2", "--threads", "1",
        "--max-pixels", str(MAX_PIXELS), "--batch-window-ms", "50", "--served-model-name", "tiny-llava",
        "--max-body-bytes", str(MAX_BODY), "--max-images", "2", "--max-tokens", "100000",
        "--body-timeout", str(BODY_TIMEOUT),
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serve_process(args, log) as srv:
        yield {**srv, "model": "tiny-llava", "log": log}


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(api_key="unused", base_url=server["base"] + "/v1", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(model_dir):
    """The same model in this process, for requests run alone."""
    from tokenprune.serve.model import load_model

    return load_model(model_dir)


def metrics(server) -> dict[str, float]:
    with urllib.request.urlopen(server["base"] + "/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def settled_metrics(server) -> dict[str, float]:
    """Metrics once the previous test's last batch is recorded (a client gets its answer before the
    worker records the batch): the batch count unchanged over 0.3 s, at most 5 s."""
    now = metrics(server)
    for _ in range(15):
        time.sleep(0.3)
        now, last = metrics(server), now
        if now.get("tokenprune_batch_size_count") == last.get("tokenprune_batch_size_count"):
            break
    return now


def post(server, body: bytes | dict, path: str = "/v1/chat/completions", method: str = "POST"):
    """Raw HTTP: (status, parsed JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, body=data if method == "POST" else None, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, json.loads(raw)


def alone(local, img, method: str | None, budget: float | None, max_tokens: int, text: str = QUESTION):
    """Greedy text, kept set and realised budget of one request run alone in this process."""
    return tiny.greedy_alone(*local, img, demo.prompt(text), method, budget, max_tokens)


# ---- unit: prompt rendering and parsing --------------------------------------------------------


def test_render_matches_demo_prompt():
    url = data_url(tiny.image(20, 30, 1))
    prompt, images = render_messages(user(url), Limits())
    assert prompt == demo.prompt(QUESTION)
    assert len(images) == 1 and images[0].size == (30, 20) and images[0].mode == "RGB"


def test_parse_chat_defaults():
    req = parse_chat({"model": "m", "messages": user(data_url(tiny.image(8, 8, 1)))}, Limits())
    assert req.max_tokens is None and not req.stream and req.temperature == 0.0 and req.reduction is None


def test_override_inherits_the_default_budget_only_where_it_is_used(local):
    """A per-request method takes the server's default budget unless it would ignore one (early exit,
    an explicit schedule), which ``patch()`` refuses."""
    from tokenprune.serve.model import ModelRunner
    from tokenprune.serve.protocol import Reduction

    runner = ModelRunner(*local, Reduction("pdrop", 0.2), Limits(), "m")
    assert runner.resolve(Reduction("fastv", None)).budget == 0.2
    assert runner.resolve(Reduction("fastv", None, (("k", 2), ("r", 0.5)))).budget is None
    assert runner.resolve(Reduction("early_exit", None, (("threshold", 0.9),))).budget is None
    with pytest.raises(tokenprune.serve.errors.APIError, match="budget: early_exit would ignore"):
        runner.resolve(Reduction("early_exit", 0.5))


# ---- the server through the openai client ---------------------------------------------------------


def test_models_and_health(server, client):
    ids = [m.id for m in client.models.list()]
    assert ids == [server["model"]]
    with urllib.request.urlopen(server["base"] + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


def test_plain_completion_and_usage_extension(server, client, local):
    img = tiny.image(40, 48, 1)
    before = metrics(server)
    resp = client.chat.completions.create(model=server["model"], messages=user(data_url(img)), max_tokens=6)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    ext = resp.usage.model_extra["tokenprune"]
    assert ext["method"] == "pdrop" and ext["budget"] == 0.2
    assert 0 < ext["kept_visual_tokens"] < ext["visual_tokens"]
    per_layer = ext["visual_tokens_per_layer"]
    assert ext["realized_budget"] == pytest.approx(sum(per_layer) / (len(per_layer) * ext["visual_tokens"]), abs=1e-6)
    text, kept, realized = alone(local, img, "pdrop", 0.2, 6)
    assert choice.message.content == text
    assert ext["realized_budget"] == pytest.approx(realized, abs=1e-6)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    after = metrics(server)
    moved = {k: after[k] - before.get(k, 0) for k in after}
    assert moved['tokenprune_requests_total{status="ok"}'] == 1
    assert moved['tokenprune_kept_visual_tokens_total{method="pdrop"}'] == ext["kept_visual_tokens"]
    assert moved['tokenprune_visual_tokens_total{method="pdrop"}'] == ext["visual_tokens"]
    assert moved["tokenprune_prompt_tokens_total"] == resp.usage.prompt_tokens
    assert moved["tokenprune_completion_tokens_total"] == resp.usage.completion_tokens
    assert moved["tokenprune_time_to_first_token_seconds_count"] == 1
    assert moved["tokenprune_request_latency_seconds_count"] == 1


def test_streaming(server, client):
    msgs = user(data_url(tiny.image(32, 32, 2)))
    plain = client.chat.completions.create(model=server["model"], messages=msgs, max_tokens=7)
    stream = client.chat.completions.create(
        model=server["model"], messages=msgs, max_tokens=7, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert finals[0].model_extra["tokenprune"]["kept_visual_tokens"] == plain.usage.model_extra["tokenprune"][
        "kept_visual_tokens"
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.model_extra["tokenprune"] == plain.usage.model_extra["tokenprune"]


def test_per_request_override(server, client, local):
    img = tiny.image(48, 40, 3)
    resp = client.chat.completions.create(
        model=server["model"],
        messages=user(data_url(img)),
        max_tokens=4,
        extra_body={"tokenprune": {"method": "fastv", "budget": 0.5, "return_kept": True}},
    )
    ext = resp.usage.model_extra["tokenprune"]
    assert ext["method"] == "fastv" and ext["budget"] == 0.5
    text, kept, realized = alone(local, img, "fastv", 0.5, 4)
    assert ext["kept"] == [k for k in kept if k >= 0] and ext["kept_visual_tokens"] == len(ext["kept"])
    assert ext["realized_budget"] == pytest.approx(realized, abs=1e-6)
    assert resp.choices[0].message.content == text
    none = client.chat.completions.create(
        model=server["model"], messages=user(data_url(img)), max_tokens=4, extra_body={"tokenprune": {"method": "none"}}
    )
    ext = none.usage.model_extra["tokenprune"]
    assert ext["method"] == "none" and ext["kept_visual_tokens"] == ext["visual_tokens"] and ext["realized_budget"] == 1
    assert none.choices[0].message.content == alone(local, img, None, None, 4)[0]
    fixed = client.chat.completions.create(
        model=server["model"], messages=user(data_url(img)), max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert fixed.usage.completion_tokens == 5 and fixed.choices[0].finish_reason == "length"
    two = client.chat.completions.create(
        model=server["model"], messages=user([data_url(img), data_url(tiny.image(32, 32, 4))]), max_tokens=2
    )
    one = client.chat.completions.create(model=server["model"], messages=user(data_url(img)), max_tokens=2)
    n_one = one.usage.model_extra["tokenprune"]["visual_tokens"]
    assert two.usage.model_extra["tokenprune"]["visual_tokens"] == 2 * n_one
    assert two.usage.prompt_tokens >= one.usage.prompt_tokens + n_one  # + the second "<image>\n"
    budget_only = client.chat.completions.create(
        model=server["model"], messages=user(data_url(img)), max_tokens=2, extra_body={"tokenprune": {"budget": 0.5}}
    )
    ext = budget_only.usage.model_extra["tokenprune"]
    assert ext["method"] == "pdrop" and ext["budget"] == 0.5


def test_concurrent_requests_are_batched_and_traces_not_mixed(server, local):
    """Different images and two reductions at once: each response's kept set and text equal the
    request run alone, and at least one batch held more than one request."""
    openai = pytest.importorskip("openai")
    reductions = [("pdrop", 0.4), ("fastv", 0.5)]
    specs = [(tiny.image(24 + 8 * i, 64 - 4 * i, 10 + i), reductions[i % 2]) for i in range(8)]
    before = settled_metrics(server)

    async def go():
        ac = openai.AsyncOpenAI(api_key="unused", base_url=server["base"] + "/v1", max_retries=0, timeout=120)
        calls = [
            ac.chat.completions.create(
                model=server["model"],
                messages=user(data_url(img)),
                max_tokens=3 + i % 3,
                extra_body={"tokenprune": {"method": m, "budget": b, "return_kept": True}},
            )
            for i, (img, (m, b)) in enumerate(specs)
        ]
        out = await asyncio.gather(*calls)
        await ac.close()
        return out

    responses = asyncio.run(go())
    kept_sets = set()
    for i, ((img, (m, b)), resp) in enumerate(zip(specs, responses)):
        ext = resp.usage.model_extra["tokenprune"]
        text, kept, realized = alone(local, img, m, b, 3 + i % 3)
        assert ext["method"] == m and ext["kept"] == [k for k in kept if k >= 0], i
        assert ext["realized_budget"] == pytest.approx(realized, abs=1e-6), i
        assert resp.choices[0].message.content == text, i
        kept_sets.add(tuple(ext["kept"]))
    assert len(kept_sets) > 2  # rows really differ, so a mix-up would show
    after = metrics(server)
    batches = after["tokenprune_batch_size_count"] - before["tokenprune_batch_size_count"]
    assert after["tokenprune_batch_size_sum"] - before["tokenprune_batch_size_sum"] == len(specs)
    assert batches < len(specs)


# ---- malformed input: each case gets its documented 4xx, the server stays up ---------------------


def _bad_cases(model: str, context: int) -> list[tuple[str, bytes | dict, int, str | None]]:
    ok = data_url(tiny.image(32, 32, 1))
    png = base64.b64decode(ok.split(",", 1)[1])
    truncated = "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()
    big = data_url(tiny.image(600, 600, 2))  # 360,000 pixels > MAX_PIXELS
    body = lambda **kw: {"model": model, "messages": user(ok), "max_tokens": 4, **kw}  # noqa: E731
    tp = lambda **kw: body(tokenprune=kw)  # noqa: E731
    return [
        ("malformed json", b'{"model": "x", "messages": [', 400, "invalid_json"),
        ("not an object", b"[1, 2, 3]", 400, "invalid_json"),
        ("empty body", b"", 400, "invalid_json"),
        ("body too large", b'{"model": "' + b"x" * (MAX_BODY + 10) + b'"}', 413, "request_too_large"),
        ("no model", {"messages": user(ok)}, 400, None),
        ("unknown model", body(model="gpt-nope"), 404, "model_not_found"),
        ("no messages", {"model": model}, 400, None),
        ("messages not a list", body(messages="hi"), 400, None),
        ("bad role", body(messages=[{"role": "robot", "content": "hi"}]), 400, None),
        ("no image", body(messages=[{"role": "user", "content": "hello"}]), 400, "missing_image"),
        ("image part without url", body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
         "invalid_image"),
        ("unknown part type", body(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), 400, None),
        ("corrupt base64", body(messages=user("data:image/png;base64,@@not-base64@@")), 400, "invalid_image"),
        ("not an image", body(messages=user("data:image/png;base64," + base64.b64encode(b"hello" * 50).decode())),
         400, "invalid_image"),
        ("truncated png", body(messages=user(truncated)), 400, "invalid_image"),
        ("over pixel limit", body(messages=user(big)), 400, "image_too_large"),
        ("extreme aspect ratio", body(messages=user(data_url(tiny.image(2, 400, 3)))), 400, "image_aspect_ratio"),
        ("too many images", body(messages=user([ok, ok, ok])), 400, "too_many_images"),
        ("remote url refused", body(messages=user("http://127.0.0.1:9/cat.png")), 400, "remote_images_disabled"),
        ("local path", body(messages=user("/etc/passwd")), 400, "invalid_image"),
        ("file url", body(messages=user("file:///etc/passwd")), 400, "invalid_image"),
        ("unknown method", tp(method="nope"), 400, "UnknownMethodError"),
        ("budget zero", tp(budget=0), 400, "BudgetError"),
        ("budget above one", tp(budget=1.5), 400, "BudgetError"),
        ("budget unreachable", tp(method="fastv", budget=0.01), 400, "BudgetError"),
        ("budget not a number", tp(budget="half"), 400, None),
        ("bad method param", tp(method="fastv", budget=0.5, params={"bogus": 1}), 400, "MethodArgumentError"),
        ("tokenprune not an object", body(tokenprune="pdrop"), 400, None),
        ("prompt over context", body(messages=user(ok, "tell me " * context)), 400, "context_length_exceeded"),
        ("max_tokens over context", body(max_tokens=context), 400, "context_length_exceeded"),
        ("max_tokens zero", body(max_tokens=0), 400, None),
        ("max_tokens not int", body(max_tokens="ten"), 400, None),
        ("n above one", body(n=2), 400, None),
        ("temperature out of range", body(temperature=5), 400, None),
        ("stream not bool", body(stream="yes"), 400, None),
    ]  # fmt: skip


def test_malformed_inputs_get_4xx(server):
    before = metrics(server)
    with urllib.request.urlopen(server["base"] + "/v1/models", timeout=10) as r:
        context = json.loads(r.read())["data"][0]["tokenprune"]["context_length"]
    cases = _bad_cases(server["model"], context)
    for name, body, status, code in cases:
        got, err = post(server, body)
        assert got == status, (name, got, err)
        assert set(err) == {"error"} and err["error"]["message"], name
        assert err["error"]["type"] in ("invalid_request_error", "not_found_error"), name
        if code is not None:
            assert err["error"]["code"] == code, (name, err)
    assert post(server, {}, path="/v1/nothing", method="GET")[0] == 404
    status, err = post(server, {}, method="GET")
    assert status == 405 and "error" in err
    after = metrics(server)
    n4xx = sum(after.get(f'tokenprune_request_errors_total{{code="{s}"}}', 0) for s in (400, 404, 413))
    n4xx_before = sum(before.get(f'tokenprune_request_errors_total{{code="{s}"}}', 0) for s in (400, 404, 413))
    assert n4xx - n4xx_before == len(cases)
    assert "tokenprune_request_errors_total{code=\"500\"}" not in after
    with urllib.request.urlopen(server["base"] + "/health", timeout=10) as r:  # still answering
        assert json.loads(r.read())["status"] == "ok"
    status, ok = post(server, {"model": server["model"], "messages": user(data_url(tiny.image(32, 32, 1))),
                               "max_tokens": 2})  # fmt: skip
    assert status == 200 and ok["choices"][0]["message"]["role"] == "assistant"


# ---- load ----------------------------------------------------------------------------------------

SIZES = [(16, 16), (32, 32), (40, 48), (96, 64), (224, 224), (480, 320)]


def run_load(server, n: int, concurrency: int) -> dict:
    """``n`` requests from ``concurrency`` clients (images of several sizes, streaming and not,
    default and overridden reductions); returns counts and latencies."""
    openai = pytest.importorskip("openai")
    urls = [data_url(tiny.image(h, w, i)) for i, (h, w) in enumerate(SIZES)]
    overrides = [None, {"method": "none"}, {"method": "fastv", "budget": 0.5}]

    async def go():
        ac = openai.AsyncOpenAI(api_key="unused", base_url=server["base"] + "/v1", max_retries=0, timeout=300)
        sem = asyncio.Semaphore(concurrency)
        errors: list[str] = []
        latencies: list[float] = []

        async def one(i: int) -> None:
            async with sem:
                t = time.perf_counter()
                kw = {"model": server["model"], "messages": user(urls[i % len(urls)]), "max_tokens": 4 + i % 5}
                if overrides[i % 3] is not None:
                    kw["extra_body"] = {"tokenprune": overrides[i % 3]}
                try:
                    if i % 4 == 0:
                        stream = await ac.chat.completions.create(stream=True, **kw)
                        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                        assert isinstance(text, str)
                    else:
                        resp = await ac.chat.completions.create(**kw)
                        assert resp.usage.model_extra["tokenprune"]["visual_tokens"] > 0
                except Exception as exc:  # counted, reported below
                    errors.append(f"{i}: {type(exc).__name__}: {exc}")
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
        await ac.close()
        return {"errors": errors, "latencies": sorted(latencies), "wall": wall}

    return asyncio.run(go())


def test_small_load(server):
    out = run_load(server, 48, 16)
    assert out["errors"] == []
    with urllib.request.urlopen(server["base"] + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


@pytest.mark.slow
def test_load_200_at_16(server):
    before = metrics(server)
    out = run_load(server, 200, 16)
    lat = out["latencies"]
    print(f"\nload: 200 requests at concurrency 16 in {out['wall']:.1f} s, p50 {lat[100]:.3f} s, p95 {lat[189]:.3f} s")
    assert out["errors"] == [], out["errors"][:5]
    after = metrics(server)
    ok = 'tokenprune_requests_total{status="ok"}'
    assert after[ok] - before.get(ok, 0) == 200
    with urllib.request.urlopen(server["base"] + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


# ---- content type, seed, disconnects and slow bodies -----------------------------------------------


def raw_post(server, body: bytes, content_type: str | None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    if content_type is not None:
        conn.putheader("Content-Type", content_type)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def test_only_json_content_types_are_accepted(server):
    """A page on any site can POST text/plain, form or multipart bodies to 127.0.0.1 without a CORS
    preflight: such bodies get 415 even when they hold valid JSON."""
    body = json.dumps({"model": server["model"], "messages": user(data_url(tiny.image(32, 32, 1))), "max_tokens": 1})
    for ctype in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                  "multipart/form-data; boundary=x", None, ""):  # fmt: skip
        status, err = raw_post(server, body.encode(), ctype)
        assert status == 415 and err["error"]["code"] == "unsupported_media_type", (ctype, status, err)
    for ctype in ("application/json", "Application/JSON; charset=utf-8", "application/vnd.api+json"):
        status, ok = raw_post(server, body.encode(), ctype)
        assert status == 200 and ok["choices"][0]["message"]["role"] == "assistant", (ctype, status, ok)


def test_seed_makes_sampling_reproducible_alone_and_batched(server, client):
    msgs = user(data_url(tiny.image(40, 48, 5)))

    def sample(seed: int) -> str:
        resp = client.chat.completions.create(model=server["model"], messages=msgs, max_tokens=10, temperature=2.0,
                                              seed=seed, extra_body={"ignore_eos": True})  # fmt: skip
        return resp.choices[0].message.content

    first = {seed: sample(seed) for seed in range(4)}
    assert sample(2) == first[2] and sample(0) == first[0]
    assert len(set(first.values())) > 1  # different seeds draw differently

    openai = pytest.importorskip("openai")

    async def together(seeds):
        ac = openai.AsyncOpenAI(api_key="unused", base_url=server["base"] + "/v1", max_retries=0, timeout=120)
        out = await asyncio.gather(*(
            ac.chat.completions.create(model=server["model"], messages=msgs, max_tokens=10, temperature=2.0,
                                       seed=s, extra_body={"ignore_eos": True})
            for s in seeds))  # fmt: skip
        await ac.close()
        return [r.choices[0].message.content for r in out]

    assert asyncio.run(together([1, 3, 1, 0])) == [first[1], first[3], first[1], first[0]]
    for bad in ("7", 1.5, True, 2**64):
        status, err = post(server, {"model": server["model"], "messages": msgs, "seed": bad})
        assert status == 400 and err["error"]["param"] == "seed", bad


def _error_count(server, code: int) -> float:
    return metrics(server).get(f'tokenprune_request_errors_total{{code="{code}"}}', 0.0)


def _partial_request(server, declared: int, sent: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server["port"]), timeout=BODY_TIMEOUT + 20)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + sent)
    return sock


def test_client_leaving_mid_body_is_a_client_error(server):
    before = _error_count(server, 499)
    log_before = server["log"].read_text()
    for _ in range(3):
        _partial_request(server, 5000, b'{"model": "tiny-llava", "mess').close()
    deadline = time.monotonic() + 20
    while _error_count(server, 499) < before + 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _error_count(server, 499) == before + 3
    new_log = server["log"].read_text()[len(log_before) :]
    assert "Traceback" not in new_log and "unhandled error" not in new_log, new_log
    assert "tokenprune_request_errors_total{code=\"500\"}" not in metrics(server)


def test_a_body_that_never_arrives_times_out(server):
    t0 = time.monotonic()
    with _partial_request(server, 100, b"{") as sock:
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    elapsed = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert BODY_TIMEOUT - 0.5 <= elapsed < BODY_TIMEOUT + 15
    with urllib.request.urlopen(server["base"] + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
