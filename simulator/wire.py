"""OpenAI's wire format: request validation, error bodies, completion and chunk JSON."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

JSON = dict[str, Any]
T = TypeVar("T")

WORDS_PER_CHUNK = 3  # "a few words" per streamed delta, like real token bursts
ROLES = ("system", "developer", "user", "assistant", "tool")
_DATA_URL = re.compile(r"data:(?P<media>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)", re.DOTALL)


def error_response(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def fault_response(status: int, retry_after: int) -> web.Response:
    """An injected error, shaped like the real one the SDK maps to the same exception."""
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    if status == 429:
        return error_response(
            429,
            "Rate limit reached for requests (injected by the simulator).",
            type_="requests",
            code="rate_limit_exceeded",
            headers=headers,
        )
    if status >= 500:
        return error_response(
            status,
            "The server had an error while processing your request (injected by the simulator).",
            type_="server_error",
            headers=headers,
        )
    return error_response(status, "Injected by the simulator.", headers=headers)


class RequestError(Exception):
    """A 400 with OpenAI's error JSON; `param` names the offending field like OpenAI does."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def response(self) -> web.Response:
        return error_response(400, self.message, param=self.param)


@dataclass(frozen=True)
class Image:
    """An image part: data URLs are decoded (media type, size, digest); remote URLs only named."""

    url: str
    media_type: str | None = None
    size: int | None = None
    digest: str | None = None


@dataclass(frozen=True)
class Message:
    role: str
    text: str
    images: tuple[Image, ...] = ()


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None


@dataclass(frozen=True)
class Answer:
    """What the assistant says, as word-sized tokens so streaming and usage agree."""

    pieces: tuple[str, ...]
    finish_reason: str
    prompt_tokens: int

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def usage(self) -> JSON:
        completion_tokens = len(self.pieces)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }


def _json_type(value: object) -> str:
    names = {
        bool: "a boolean", int: "an integer", float: "a decimal", str: "a string",
        list: "an array", dict: "an object", type(None): "null",
    }  # fmt: skip
    return names.get(type(value), "an unknown type")


def _typed(value: object, kind: type[T], param: str, expected: str) -> T:
    # bool is an int subclass in Python, but true is no JSON integer.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise RequestError(
            f"Invalid type for '{param}': expected {expected}, "
            f"but got {_json_type(value)} instead.",
            param,
        )
    return value


def _parse_image(part: JSON, param: str) -> Image:
    image_url = _typed(part.get("image_url"), dict, f"{param}.image_url", "an object")
    url = _typed(image_url.get("url"), str, f"{param}.image_url.url", "a string")
    if url.startswith(("https://", "http://")):
        return Image(url=url)
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise RequestError(
            "Invalid image URL: expected an https URL or a base64 data URL "
            "like 'data:image/png;base64,...'.",
            f"{param}.image_url.url",
        )
    try:
        data = base64.b64decode(match["data"], validate=True)
    except binascii.Error:
        data = b""
    if not data:
        raise RequestError("Invalid base64 image_url.", f"{param}.image_url.url")
    digest = hashlib.sha256(data).hexdigest()
    return Image(url=url, media_type=match["media"], size=len(data), digest=digest)


def _parse_content(role: str, content: object, param: str) -> tuple[str, tuple[Image, ...]]:
    if isinstance(content, str):
        return content, ()
    parts = _typed(content, list, param, "a string or an array of content parts")
    if not parts:
        raise RequestError(
            f"Invalid '{param}': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            param,
        )
    texts: list[str] = []
    images: list[Image] = []
    for j, item in enumerate(parts):
        part_param = f"{param}[{j}]"
        part = _typed(item, dict, part_param, "an object")
        kind = part.get("type")
        if kind == "text":
            texts.append(_typed(part.get("text"), str, f"{part_param}.text", "a string"))
        elif kind == "image_url":
            if role != "user":
                raise RequestError(
                    f"Invalid '{part_param}': image_url parts are only allowed in 'user' messages.",
                    part_param,
                )
            images.append(_parse_image(part, part_param))
        else:
            raise RequestError(
                f"Invalid value: '{kind}'. Supported values are: 'text' and 'image_url'.",
                f"{part_param}.type",
            )
    return "\n".join(texts), tuple(images)


def _parse_message(item: object, param: str) -> Message:
    message = _typed(item, dict, param, "an object")
    role = message.get("role")
    if role is None:
        raise RequestError(f"Missing required parameter: '{param}.role'.", f"{param}.role")
    if role not in ROLES:
        supported = ", ".join(f"'{r}'" for r in ROLES)
        raise RequestError(
            f"Invalid value: '{role}'. Supported values are: {supported}.",
            f"{param}.role",
        )
    content = message.get("content")
    if content is None:
        # Assistant turns that only carry tool calls have no content.
        if role == "assistant":
            return Message(role, "")
        raise RequestError(f"Missing required parameter: '{param}.content'.", f"{param}.content")
    text, images = _parse_content(role, content, f"{param}.content")
    return Message(role, text, images)


def _optional_int(body: JSON, name: str, minimum: int) -> int | None:
    if body.get(name) is None:
        return None
    value = _typed(body[name], int, name, "an integer")
    if value < minimum:
        raise RequestError(
            f"Invalid '{name}': integer below minimum value. Expected a value >= {minimum}, "
            f"but got {value} instead.",
            name,
        )
    return value


def _check_number(body: JSON, name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(
            f"Invalid type for '{name}': expected a number, but got {_json_type(value)} instead.",
            name,
        )
    if not low <= value <= high:
        raise RequestError(
            f"Invalid '{name}': expected a value between {low} and {high}, "
            f"but got {value} instead.",
            name,
        )


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Validate a /v1/chat/completions body as strictly as OpenAI does for the fields we model.
    Other fields (tools, response_format, seed, ...) are accepted and ignored."""
    try:
        decoded = json.loads(raw)
    except ValueError:
        raise RequestError(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)"
        ) from None
    if not isinstance(decoded, dict):
        raise RequestError("Invalid request body: expected a JSON object.")
    body: JSON = decoded

    if body.get("model") in (None, ""):
        raise RequestError("you must provide a model parameter")
    model = _typed(body["model"], str, "model", "a string")

    if "messages" not in body:
        raise RequestError("Missing required parameter: 'messages'.", "messages")
    messages = _typed(body["messages"], list, "messages", "an array")
    if not messages:
        raise RequestError(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            "messages",
        )
    parsed = tuple(_parse_message(m, f"messages[{i}]") for i, m in enumerate(messages))

    stream = _typed(body.get("stream", False), bool, "stream", "a boolean")
    include_usage = False
    if body.get("stream_options") is not None:
        if not stream:
            raise RequestError(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options",
            )
        options = _typed(body["stream_options"], dict, "stream_options", "an object")
        flag = options.get("include_usage", False)
        include_usage = _typed(flag, bool, "stream_options.include_usage", "a boolean")

    # max_completion_tokens superseded max_tokens; honour either, the newer one first.
    max_tokens = _optional_int(body, "max_completion_tokens", 1)
    legacy_max = _optional_int(body, "max_tokens", 1)
    if _optional_int(body, "n", 1) not in (None, 1):
        raise RequestError("The simulator only supports n=1.", "n")
    _check_number(body, "temperature", 0, 2)
    _check_number(body, "top_p", 0, 1)
    if body.get("user") is not None:
        _typed(body["user"], str, "user", "a string")

    return ChatRequest(
        model=model,
        messages=parsed,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens if max_tokens is not None else legacy_max,
    )


def completion(completion_id: str, created: int, model: str, answer: Answer) -> JSON:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text, "refusal": None},
                "logprobs": None,
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": answer.usage(),
    }


def stream_events(
    completion_id: str, created: int, model: str, answer: Answer, *, include_usage: bool
) -> Iterator[bytes]:
    """SSE events in OpenAI's order: role, content deltas, finish, optional usage, [DONE]."""

    def chunk(choices: list[JSON], **extra: Any) -> bytes:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            # OpenAI sends "usage": null on every chunk but the last when usage was requested.
            **({"usage": None} if include_usage else {}),
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n".encode()

    def choice(delta: JSON, finish: str | None = None) -> list[JSON]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    yield chunk(choice({"role": "assistant", "content": ""}))
    pieces = answer.pieces
    for i in range(0, len(pieces), WORDS_PER_CHUNK):
        yield chunk(choice({"content": "".join(pieces[i : i + WORDS_PER_CHUNK])}))
    yield chunk(choice({}, answer.finish_reason))
    if include_usage:
        yield chunk([], usage=answer.usage())
    yield b"data: [DONE]\n\n"
