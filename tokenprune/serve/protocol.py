"""Request parsing and validation for ``/v1/chat/completions``: JSON body -> :class:`ChatRequest`.

Everything a client can get wrong is caught here (or in :mod:`.model` for what needs the model)
and raised as an :class:`~tokenprune.serve.errors.APIError` with a 4xx status:

* the body: not JSON, not an object, missing or wrongly typed fields, unsupported options (``n > 1``,
  tools), ``max_tokens`` out of range;
* messages: unknown roles, unknown content-part types, no image, too many images;
* images: only ``data:image/...;base64,`` URLs by default; remote ``http(s)`` URLs only when the
  server allows them (``--allow-remote-images``); local paths and ``file:`` URLs never; corrupt
  base64 or bytes that are no image; images over the pixel limit (checked from the header before
  decoding the pixels), or with an aspect ratio over ``max_aspect_ratio``;
* ``tokenprune`` (top level of the body, i.e. the OpenAI client's ``extra_body``): ``method``,
  ``budget`` and ``params`` validated like :func:`tokenprune.patch` (see :mod:`.model`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .errors import APIError, bad_request

IMAGE_PLACEHOLDER = "<image>"
NO_METHOD = ("none", "off", "unpruned")
_DATA_URL = re.compile(r"^data:(?P<mime>image/[A-Za-z0-9.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.S)
_ROLES = ("system", "developer", "user", "assistant")
_SUPPORTED_KEYS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options", "temperature",
    "top_p", "n", "stop", "seed", "user", "tokenprune", "frequency_penalty", "presence_penalty", "logprobs",
    "metadata", "store", "ignore_eos",
}  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """What the server accepts (set from the command line)."""

    max_pixels: int = 4096 * 4096
    max_aspect_ratio: float = 50.0  # a 1x4000 strip would be resized to a huge image by shortest-edge resizing
    max_images: int = 1
    max_image_bytes: int = 20 * 1024 * 1024
    max_tokens: int = 512
    default_max_tokens: int = 64
    allow_remote_images: bool = False
    remote_timeout: float = 10.0


@dataclass(frozen=True)
class Reduction:
    """The token reduction a request asks for: ``method`` None means unpruned. Hashable: requests
    with equal reductions (and sampling settings) are batched together."""

    method: str | None
    budget: float | None
    params: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> dict[str, Any]:
        """JSON-friendly form for responses and logs."""
        return {"method": self.method or "none", "budget": self.budget, "params": dict(self.params)}


@dataclass(frozen=True)
class PromptFormat:
    """How a conversation becomes the model's prompt text. ``chat``: the processor's chat template (HF message
    dicts -> text; real checkpoints); else LLaVA-1.5's ``USER: ... ASSISTANT:`` turns with ``image_text`` per image
    (the bundled fixtures' format: ``tokenprune.demo.prompt``). User text may not contain ``reserved`` strings (the
    image placeholders), which would make the processor expand an image that was not sent."""

    image_text: str = IMAGE_PLACEHOLDER
    reserved: tuple[str, ...] = (IMAGE_PLACEHOLDER,)
    chat: Callable[[list[dict[str, Any]]], str] | None = None


LLAVA_FORMAT = PromptFormat()


@dataclass
class ChatRequest:
    """A parsed, validated chat-completion request (images decoded, prompt rendered)."""

    model: str
    prompt: str
    images: list[Image.Image]
    max_tokens: int | None
    stream: bool = False
    include_usage: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    reduction: Reduction | None = None  # None: the server's default
    return_kept: bool = False
    ignore_eos: bool = False  # vLLM-style extension: always generate max_tokens (benchmarks)
    seed: int | None = None  # sampling seed of this request alone (its own generator, batch or not)

    @property
    def sampling(self) -> tuple[float, float, bool]:
        """Settings a batch must share besides the reduction."""
        return (self.temperature, self.top_p, self.ignore_eos)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _number(body: dict, key: str, lo: float, hi: float, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise bad_request(f"{key}: must be a number in [{lo}, {hi}], got {value!r}", param=key)
    return float(value)


def _max_tokens(body: dict, limits: Limits) -> int | None:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limits.max_tokens:
        raise bad_request(f"{key}: must be an integer in [1, {limits.max_tokens}], got {value!r}", param=key)
    return value


def _seed(body: dict) -> int | None:
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
        raise bad_request(f"seed: must be an integer in [-2**63, 2**64), got {seed!r}", param="seed")
    return seed


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("stop: must be a non-empty string or a list of at most 4 of them", param="stop")
    return stop


def parse_reduction(spec: Any) -> tuple[Reduction | None, bool]:
    """The ``tokenprune`` extension object -> (reduction or None for the server default, return_kept).
    Only its shape is checked here; :meth:`tokenprune.serve.model.ModelRunner.validate` checks it
    against the model like ``patch()`` would."""
    if spec is None:
        return None, False
    if not isinstance(spec, dict):
        raise bad_request("tokenprune: must be an object like {'method': 'pdrop', 'budget': 0.2}", param="tokenprune")
    unknown = set(spec) - {"method", "budget", "params", "return_kept"}
    if unknown:
        raise bad_request(
            f"tokenprune: unknown keys {sorted(unknown)}; allowed: method, budget, params, return_kept",
            param="tokenprune",
        )
    return_kept = spec.get("return_kept", False)
    if not isinstance(return_kept, bool):
        raise bad_request("tokenprune.return_kept: must be true or false", param="tokenprune.return_kept")
    if "method" not in spec and "budget" not in spec and "params" not in spec:
        return None, return_kept
    method = spec.get("method")
    if method is not None and not isinstance(method, str):
        raise bad_request(f"tokenprune.method: must be a string, got {method!r}", param="tokenprune.method")
    budget = spec.get("budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))):
        raise bad_request(f"tokenprune.budget: must be a number in (0, 1], got {budget!r}", param="tokenprune.budget")
    params = spec.get("params") or {}
    if not isinstance(params, dict):
        raise bad_request("tokenprune.params: must be an object of method parameters", param="tokenprune.params")
    try:
        frozen = tuple(sorted((str(k), _freeze(v)) for k, v in params.items()))
        hash(frozen)
    except TypeError:
        raise bad_request(
            "tokenprune.params: values must be JSON scalars or lists", param="tokenprune.params"
        ) from None
    if method is None and budget is None and not params:
        return None, return_kept
    if method is not None and method.lower() in NO_METHOD:
        return Reduction(None, None), return_kept
    return Reduction(method, None if budget is None else float(budget), frozen), return_kept


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        raise TypeError("nested objects")
    return value


def decode_image(url: Any, limits: Limits, param: str) -> Image.Image:
    """An RGB image from a data URL (or an ``http(s)`` URL when allowed), or a 400."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"{param}: image_url.url must be a non-empty string", param=param, code="invalid_image")
    if url.startswith("data:"):
        match = _DATA_URL.match(url)
        if match is None:
            raise bad_request(
                f"{param}: data URL must look like data:image/png;base64,<data>", param=param, code="invalid_image"
            )
        data = match.group("data")
        if len(data) * 3 // 4 > limits.max_image_bytes:
            raise bad_request(
                f"{param}: image is over {limits.max_image_bytes} bytes", param=param, code="image_too_large"
            )
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{param}: image data is not valid base64", param=param, code="invalid_image") from None
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise bad_request(
                f"{param}: remote image URLs are disabled on this server (start it with --allow-remote-images); "
                "send the image as a data:image/...;base64 URL",
                param=param,
                code="remote_images_disabled",
            )
        raw = _fetch(url, limits, param)
    else:
        raise bad_request(
            f"{param}: only data:image/...;base64 URLs are accepted (no file paths or other schemes)",
            param=param,
            code="invalid_image",
        )
    return _open(raw, limits, param)


def _fetch(url: str, limits: Limits, param: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.remote_timeout) as resp:  # noqa: S310 (scheme checked)
            raw = resp.read(limits.max_image_bytes + 1)
    except Exception as exc:  # network errors of every kind are the client's URL's problem
        raise bad_request(f"{param}: could not fetch image: {exc}", param=param, code="image_fetch_failed") from None
    if len(raw) > limits.max_image_bytes:
        raise bad_request(f"{param}: image is over {limits.max_image_bytes} bytes", param=param, code="image_too_large")
    return raw


def _open(raw: bytes, limits: Limits, param: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))  # reads the header only
            w, h = img.size
            if w * h > limits.max_pixels:
                raise bad_request(
                    f"{param}: image is {w}x{h} = {w * h} pixels; this server accepts at most {limits.max_pixels}",
                    param=param,
                    code="image_too_large",
                )
            if w < 1 or h < 1:
                raise bad_request(f"{param}: image is empty ({w}x{h})", param=param, code="invalid_image")
            if max(w, h) / min(w, h) > limits.max_aspect_ratio:
                raise bad_request(
                    f"{param}: image is {w}x{h}; this server accepts aspect ratios up to {limits.max_aspect_ratio:g}",
                    param=param,
                    code="image_aspect_ratio",
                )
            img.load()
            return img.convert("RGB")
    except APIError:
        raise
    except Image.DecompressionBombError as exc:
        raise bad_request(f"{param}: {exc}", param=param, code="image_too_large") from None
    except Exception as exc:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError, ...)
        raise bad_request(f"{param}: could not decode image: {exc}", param=param, code="invalid_image") from None


def render_messages(messages: Any, limits: Limits, fmt: PromptFormat = LLAVA_FORMAT) -> tuple[str, list[Image.Image]]:
    """The prompt text in ``fmt`` (default: LLaVA-1.5's ``USER: <image>\\n{text} ASSISTANT:``, the format of
    :func:`tokenprune.demo.prompt` for one question) and the images in order."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: must be a non-empty list", param="messages")
    parts: list[str] = []
    images: list[Image.Image] = []
    system: list[str] = []
    chat: list[dict[str, Any]] = []  # the same turns as HF chat-template messages
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(f"{where}: must be an object with role and content", param=where)
        role = msg.get("role")
        if role not in _ROLES:
            raise bad_request(f"{where}.role: must be one of {list(_ROLES)}, got {role!r}", param=f"{where}.role")
        text, n_img = _content(msg.get("content"), f"{where}.content", images, limits, fmt.reserved,
                               allow_images=role == "user")
        chat.append({"role": "system" if role == "developer" else role,
                     "content": [{"type": "image"}] * n_img + [{"type": "text", "text": text}]})
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            parts.append("USER: " + f"{fmt.image_text}\n" * n_img + text)
        else:
            parts.append(f"ASSISTANT: {text}</s>")
    if messages[-1].get("role") != "user":
        raise bad_request("messages: the last message must come from the user", param="messages")
    if not images:
        raise bad_request(
            "messages: no image; this server serves a vision-language model and needs an image_url part "
            "(data:image/...;base64)",
            param="messages",
            code="missing_image",
        )
    if fmt.chat is not None:
        return fmt.chat(chat), images
    prompt = " ".join(parts) + " ASSISTANT:"
    if system:
        prompt = " ".join(system) + " " + prompt
    return prompt, images


def _check_text(text: str, reserved: tuple[str, ...], where: str) -> str:
    for token in reserved:
        if token in text:
            raise bad_request(f"{where}: text may not contain {token!r}", param=where)
    return text


def _content(content: Any, where: str, images: list, limits: Limits, reserved: tuple[str, ...],
             allow_images: bool) -> tuple[str, int]:
    if isinstance(content, str):
        return _check_text(content, reserved, where), 0
    if not isinstance(content, list):
        raise bad_request(f"{where}: must be a string or a list of content parts", param=where)
    texts: list[str] = []
    n_img = 0
    for j, part in enumerate(content):
        p = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{p}.text: must be a string", param=p)
            texts.append(_check_text(text, reserved, f"{p}.text"))
        elif kind == "image_url":
            if not allow_images:
                raise bad_request(f"{p}: images are only accepted in user messages", param=p)
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if len(images) >= limits.max_images:
                raise bad_request(
                    f"{p}: too many images; this server accepts at most {limits.max_images} per request",
                    param=p,
                    code="too_many_images",
                )
            images.append(decode_image(url, limits, p))
            n_img += 1
        else:
            raise bad_request(f"{p}.type: must be 'text' or 'image_url', got {kind!r}", param=p)
    return "\n".join(texts), n_img


def parse_chat(body: dict[str, Any], limits: Limits, fmt: PromptFormat = LLAVA_FORMAT) -> ChatRequest:
    """Validate a chat-completion body, decode its images and render its prompt in ``fmt`` (CPU work: call it
    off the event loop)."""
    unknown = sorted(set(body) - _SUPPORTED_KEYS - {"tools", "tool_choice", "functions", "response_format"})
    if unknown:
        raise bad_request(f"unsupported parameters: {unknown}", param=unknown[0], code="unsupported_parameter")
    for key in ("tools", "functions"):
        if body.get(key):
            raise bad_request(f"{key}: tool calling is not supported by this server", param=key)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model: required, a string (see GET /v1/models)", param="model")
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request(f"n: only n=1 is supported, got {n!r}", param="n")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("stream: must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options: must be an object", param="stream_options")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad_request("ignore_eos: must be true or false", param="ignore_eos")
    reduction, return_kept = parse_reduction(body.get("tokenprune"))
    prompt, images = render_messages(body.get("messages"), limits, fmt)
    return ChatRequest(
        model=model,
        prompt=prompt,
        images=images,
        max_tokens=_max_tokens(body, limits),
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        temperature=_number(body, "temperature", 0.0, 2.0, 0.0),
        top_p=_number(body, "top_p", 1e-6, 1.0, 1.0),
        stop=_stop(body),
        reduction=reduction,
        return_kept=return_kept,
        ignore_eos=ignore_eos,
        seed=_seed(body),
    )
