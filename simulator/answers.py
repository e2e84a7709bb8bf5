"""Deterministic answers: same request, same answer; different prompt, different answer."""

from __future__ import annotations

import hashlib
import json
import re

from simulator.wire import Answer, ChatRequest, Image, Message

# OpenAI bills an image at a fixed base cost; a flat figure keeps usage plausible.
IMAGE_TOKENS = 85
SUMMARY_WORDS = 8

# "Answer in pt-BR." / "Always reply in de, please": the tag must end the clause so that
# "answer in an email" is not read as a language.
_LANG = re.compile(
    r"\b(?:answer|respond|reply)\s+(?:only\s+)?in\s+([a-z]{2,3}(?:-[a-z0-9]{2,8})*)\s*(?:[.,;:!?)]|$)",
    re.IGNORECASE | re.MULTILINE,
)
_ADJECTIVES = (
    "amber", "brisk", "calm", "dusky", "eager", "fuzzy", "gentle", "hollow",
    "icy", "jolly", "keen", "lucid", "mellow", "nimble", "odd", "plucky",
)  # fmt: skip
_NOUNS = (
    "falcon", "harbor", "lantern", "meadow", "orchard", "pebble", "quartz", "river",
    "saddle", "thistle", "umbrella", "violin", "willow", "yarrow", "zephyr", "beacon",
)  # fmt: skip
_VERBS = (
    "charts", "guards", "hums", "juggles", "kindles", "mends", "nudges", "ponders",
    "questions", "rattles", "sketches", "tends", "unravels", "weaves", "echoes", "balances",
)  # fmt: skip


def count_words(text: str) -> int:
    return len(text.split())


def _fingerprint(chat: ChatRequest) -> bytes:
    canonical = [
        chat.model,
        [[m.role, m.text, [i.digest or i.url for i in m.images]] for m in chat.messages],
    ]
    return hashlib.sha256(json.dumps(canonical).encode()).digest()


def _summary(text: str) -> str:
    words = text.split()
    head = " ".join(words[:SUMMARY_WORDS])
    return head + ("…" if len(words) > SUMMARY_WORDS else "")


def _describe(image: Image) -> str:
    if image.media_type is None:
        return f"I see an image at {image.url[:80]} (not downloaded)."
    # Wording fixed by the simulator's contract; tests elsewhere may match it verbatim.
    return f"I see a {image.media_type} image of {image.size} bytes."


def _language(messages: tuple[Message, ...]) -> str | None:
    for message in messages:
        if message.role in ("system", "developer") and (match := _LANG.search(message.text)):
            return match.group(1)
    return None


def compose(chat: ChatRequest) -> Answer:
    """Echo a summary of the last user turn, describe its images, add a hash-derived phrase."""
    users = [m for m in chat.messages if m.role == "user"]
    last = users[-1] if users else chat.messages[-1]
    digest = _fingerprint(chat)

    sentences: list[str] = []
    if lang := _language(chat.messages):
        sentences.append(f"[{lang}]")
    if last.text.strip():
        sentences.append(f'You said: "{_summary(last.text)}".')
    sentences.extend(_describe(image) for image in last.images)
    phrase = f"{_ADJECTIVES[digest[0] % 16]} {_NOUNS[digest[1] % 16]} {_VERBS[digest[2] % 16]}"
    sentences.append(f"Simulated answer: the {phrase} it (ref {digest[:4].hex()}).")

    pieces = re.findall(r"\S+\s*", " ".join(sentences))
    finish_reason = "stop"
    if chat.max_tokens is not None and chat.max_tokens < len(pieces):
        pieces = pieces[: chat.max_tokens]
        pieces[-1] = pieces[-1].rstrip()
        finish_reason = "length"

    prompt_tokens = sum(count_words(m.text) + IMAGE_TOKENS * len(m.images) for m in chat.messages)
    return Answer(tuple(pieces), finish_reason, max(1, prompt_tokens))
