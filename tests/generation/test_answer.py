"""A stored answer as a stream, and what a request's cache options mean for who asks."""

from __future__ import annotations

import pytest

from services.common.errors import ServiceError
from services.common.identity import Identity
from services.generation.answer import REPLAY_PIECE_CHARS, Answer, Usage
from services.generation.cache_policy import CacheOptions, cache_policy

TEXT = "The quick brown fox jumps over the lazy dog, then naps in the afternoon sun for hours."


def test_a_streamed_answer_replays_its_own_chunks_and_survives_the_store() -> None:
    answer = Answer("Hello there friend.", "m", Usage(1, 2, 3), chunks=(6, 6, 7))
    stored = Answer.from_json(answer.to_json())
    assert stored == answer
    assert list(stored.deltas()) == ["Hello ", "there ", "friend."]


def test_a_whole_answer_replays_in_several_word_sized_pieces() -> None:
    pieces = list(Answer(TEXT, "m", Usage()).deltas())
    assert "".join(pieces) == TEXT
    assert len(pieces) >= len(TEXT) // REPLAY_PIECE_CHARS
    assert all(0 < len(p) <= REPLAY_PIECE_CHARS for p in pieces)
    assert all(p.endswith(" ") for p in pieces[:-1])  # cut between words


def test_chunks_that_do_not_match_the_text_are_ignored() -> None:
    pieces = list(Answer(TEXT, "m", Usage(), chunks=(3, 4)).deltas())
    assert "".join(pieces) == TEXT and len(pieces) > 2


def test_an_answer_stored_before_chunking_still_reads() -> None:
    old = '{"text":"hi","model":"m","usage":{"prompt_tokens":1}}'
    assert Answer.from_json(old) == Answer("hi", "m", Usage(1, 0, 0))
    with pytest.raises(ValueError):
        Answer.from_json('{"text":"hi","chunks":"no"}')


def test_defaults_read_and_write_the_shared_cache() -> None:
    policy = cache_policy(CacheOptions(), Identity("", "", "192.0.2.1"))
    assert (policy.read, policy.write, policy.owner, policy.extra_tags) == (True, True, "", ())


def test_per_user_scope_keys_the_entry_to_its_owner_and_tags_it() -> None:
    options = CacheOptions(no_cache=True, no_store=False, per_user=True, tags=("a", "b"))
    policy = cache_policy(options, Identity("u-1", "", "192.0.2.1"))
    assert (policy.read, policy.write, policy.owner) == (False, True, "u-1")
    assert policy.extra_tags == ("a", "b", "user:u-1")


def test_a_guest_is_refused_a_per_user_entry_naming_the_field() -> None:
    with pytest.raises(ServiceError) as caught:
        cache_policy(CacheOptions(per_user=True), Identity("", "", "192.0.2.1"))
    assert [v.field for v in caught.value.violations] == ["cache.scope"]
