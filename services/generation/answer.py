"""What a generation produces, in the shape the cache stores and the servicer returns, and how
a stored answer replays as a stream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

# A cached answer that was never streamed (it came from a unary call) replays in pieces of
# about this many characters, cut after a space where one is near: the size of the few words
# an upstream sends per delta.
REPLAY_PIECE_CHARS = 24


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class Answer:
    text: str
    # The model that answered, as the upstream reported it.
    model: str
    usage: Usage
    # The lengths (in characters) of the deltas the upstream streamed, in order, so a cached
    # stream replays with its original chunking; empty when the answer came whole.
    chunks: tuple[int, ...] = ()

    def deltas(self) -> Iterator[str]:
        """The text as a stream: the original deltas when they are known, else pieces of
        about REPLAY_PIECE_CHARS. Nothing for an empty answer."""
        if self.chunks and sum(self.chunks) == len(self.text):
            start = 0
            for size in self.chunks:
                if size:
                    yield self.text[start : start + size]
                start += size
            return
        yield from _pieces(self.text, REPLAY_PIECE_CHARS)

    def to_json(self) -> str:
        data = asdict(self)
        if not self.chunks:
            del data["chunks"]
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Answer:
        """Raises ValueError (or a subclass) on anything that is not a stored answer."""
        data: Any = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a cached answer must be a JSON object")
        usage = data.get("usage") or {}
        chunks = data.get("chunks") or []
        if (
            not isinstance(data.get("text"), str)
            or not isinstance(usage, dict)
            or not isinstance(chunks, list)
        ):
            raise ValueError("malformed cached answer")
        return cls(
            text=data["text"],
            model=str(data.get("model", "")),
            usage=Usage(
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
                total_tokens=int(usage.get("total_tokens", 0)),
            ),
            chunks=tuple(int(size) for size in chunks),
        )


def _pieces(text: str, size: int) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            # Cut after the last space in the second half of the piece, if there is one.
            space = text.rfind(" ", start + size // 2, end)
            if space != -1:
                end = space + 1
        yield text[start:end]
        start = end
