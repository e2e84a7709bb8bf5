"""Single-flight across replicas: a short lease in Redis says which replica is computing an
answer; the others wait for the outcome it publishes.

Layout under the deployment's prefix (private to the generation service's replicas):

- `genflight:lease:<flight key>`   the leader's token, with a TTL the leader renews while its
  upstream call runs (so a replica that dies mid-call frees the key within one TTL);
- `genflight:result:<token>`        the outcome, for RESULT_TTL_SECONDS: `answer:` and the
  answer's JSON, or `error:` and the serialized google.rpc.Status of the error.

Followers poll for the result of the token they saw, and take the lease themselves when it
disappears without one (the leader died or its callers all left). Every Redis failure means
"lead locally": with Redis down, single-flight is per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from redis.asyncio import Redis

from services.common.errors import ServiceError, error_info_from_call
from services.common.redis import RedisUnavailable, ResilientRedis
from services.generation.answer import Answer

log = logging.getLogger(__name__)

NAMESPACE = "genflight"
# Long enough for followers on other replicas to read it once the leader finishes.
RESULT_TTL_SECONDS = 30
POLL_FIRST_SECONDS = 0.02
POLL_MAX_SECONDS = 0.2

_ANSWER = b"answer:"
_ERROR = b"error:"

# Renew / release only while the lease still holds our token.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class Lease:
    """This replica computes; `token` names its result."""

    key: str
    token: str


@dataclass(frozen=True)
class Following:
    """Another replica computes under `token`."""

    key: str
    token: str


class FlightLeases:
    def __init__(self, redis: ResilientRedis, lease_seconds: float) -> None:
        self.redis = redis
        self.lease_ms = max(1, int(lease_seconds * 1000))

    def _lease_key(self, key: str) -> str:
        return self.redis.key(NAMESPACE, "lease", key)

    def _result_key(self, token: str) -> str:
        return self.redis.key(NAMESPACE, "result", token)

    async def claim(self, key: str) -> Lease | Following | None:
        """The lease, or who holds it; None when Redis cannot say (lead locally)."""
        token = uuid.uuid4().hex
        lease_key = self._lease_key(key)

        async def set_if_free(client: Redis) -> bytes | str | None:
            # SET NX GET: one round trip that either takes the lease or returns the holder.
            held = await client.set(lease_key, token, nx=True, px=self.lease_ms, get=True)
            return held if isinstance(held, bytes | str) else None

        try:
            held = await self.redis.run("flight_claim", set_if_free)
        except RedisUnavailable:
            return None
        if held is None:
            return Lease(key, token)
        return Following(key, held.decode() if isinstance(held, bytes) else held)

    @asynccontextmanager
    async def renewed(self, lease: Lease) -> AsyncIterator[None]:
        """Keeps the lease alive for the block."""
        task = asyncio.create_task(self._renew(lease), name="flight-lease-renew")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _renew(self, lease: Lease) -> None:
        lease_key = self._lease_key(lease.key)
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            # On failure followers fall back to their own call when the lease lapses.
            with contextlib.suppress(RedisUnavailable):
                await self.redis.run(
                    "flight_renew",
                    lambda client: client.eval(_RENEW, 1, lease_key, lease.token, self.lease_ms),
                )

    async def publish(self, lease: Lease, outcome: Answer | ServiceError) -> None:
        """The outcome for followers, then the lease released. Never raises."""
        if isinstance(outcome, Answer):
            payload = _ANSWER + outcome.to_json().encode()
        else:
            payload = _ERROR + outcome.to_status_proto().SerializeToString()
        result_key, lease_key = self._result_key(lease.token), self._lease_key(lease.key)

        async def write(client: Redis) -> None:
            # One round trip, in this order: followers find the outcome once the lease is gone.
            async with client.pipeline(transaction=False) as pipe:
                pipe.set(result_key, payload, ex=RESULT_TTL_SECONDS)
                pipe.eval(_RELEASE, 1, lease_key, lease.token)
                await pipe.execute()

        with contextlib.suppress(RedisUnavailable):
            await self.redis.run("flight_publish", write)

    async def release(self, lease: Lease) -> None:
        """Give the lease up without an outcome (our callers all left). Never raises."""
        lease_key = self._lease_key(lease.key)
        with contextlib.suppress(RedisUnavailable):
            await self.redis.run(
                "flight_release", lambda client: client.eval(_RELEASE, 1, lease_key, lease.token)
            )

    async def follow(self, following: Following) -> Answer | ServiceError | None:
        """The leader's outcome, waiting as long as it holds the lease (the caller bounds
        the wait with its deadline); None when the lease went away without one or Redis
        failed: the caller should claim the lease itself."""
        result_key, lease_key = self._result_key(following.token), self._lease_key(following.key)
        delay = POLL_FIRST_SECONDS
        while True:
            try:
                raw, holder = await self.redis.run(
                    "flight_follow", lambda client: client.mget(result_key, lease_key)
                )
            except RedisUnavailable:
                return None
            if raw is not None:
                return _decode(raw)
            if holder is None or _text(holder) != following.token:
                return None
            await asyncio.sleep(delay)
            delay = min(POLL_MAX_SECONDS, delay * 2)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(raw: bytes | str) -> Answer | ServiceError | None:
    data = raw.encode() if isinstance(raw, str) else raw
    try:
        if data.startswith(_ANSWER):
            return Answer.from_json(data[len(_ANSWER) :])
        if data.startswith(_ERROR):
            return error_info_from_call([("grpc-status-details-bin", data[len(_ERROR) :])])
    except Exception:  # a corrupt entry: compute rather than fail
        log.warning("ignoring an unreadable single-flight result", exc_info=True)
    return None
