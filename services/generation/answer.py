"""What a generation produces, in the shape the cache stores and the servicer returns."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Answer:
        """Raises ValueError (or a subclass) on anything that is not a stored answer."""
        data: Any = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a cached answer must be a JSON object")
        usage = data.get("usage") or {}
        if not isinstance(data.get("text"), str) or not isinstance(usage, dict):
            raise ValueError("malformed cached answer")
        return cls(
            text=data["text"],
            model=str(data.get("model", "")),
            usage=Usage(
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
                total_tokens=int(usage.get("total_tokens", 0)),
            ),
        )
