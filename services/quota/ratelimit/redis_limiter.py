"""The shared limiter: one Lua script per check, so the count is exact however many quota
replicas (and Envoys) decide at once.

Keys, per subject, all under the subject's hash tag so a script's keys share one slot and it
runs unchanged on Redis Cluster:

    rl:{ip:2001:db8:1:2::/64}:gcra:<route>   GCRA theoretical arrival time (µs, Redis clock)
    rl:{ip:...}:violations                   refusals in the current escalation window
    rl:{ip:...}:level                        blocks so far (forgotten after forget_after)
    rl:{ip:...}:block                        present while blocked; its value is the level

and one index, `rl:blocks` (a sorted set: subject -> end of block in unix ms), so operators can
list blocks without scanning keys; it is written after the block (another slot on a Cluster)
and its ended entries are dropped as it is read.

Time is Redis's own (TIME), so replicas with skewed clocks agree on every window.

A rate-limit decision has a budget (RATE_LIMIT_REDIS_TIMEOUT_MS, `timeout_seconds`), far
shorter than the shared client's timeouts: Envoy waits only GATEWAY_RATE_LIMIT_TIMEOUT_MS for
the answer and then lets the request pass, so a Redis that is slow but alive must not use the
whole wait. The Redis calls of one check (the script, and the block index when the check
starts a block) share one deadline; past it the caller gets RedisUnavailable and decides from
memory. The breaker does not count an expired budget: on a busy machine the budget also runs
out while the event loop is late, with Redis answering in time, and opening the breaker then
would move every quota and limit of this replica into memory under load. A Redis that is
really away fails the shared client's own calls (connection errors, its timeouts), which the
breaker counts. Listing and lifting blocks are operators' calls and keep the shared client's
timeouts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

from prometheus_client import Counter
from redis.asyncio import Redis

from services.common.redis import RedisUnavailable, ResilientRedis
from services.quota.ratelimit.config import Escalation, Limit
from services.quota.ratelimit.limiter import Block, CheckResult, Subject, Verdict

log = logging.getLogger(__name__)
T = TypeVar("T")

BUDGET_EXPIRED = Counter(
    "genmesh_ratelimit_redis_budget_expired_total",
    "Rate-limit Redis calls cut at RATE_LIMIT_REDIS_TIMEOUT_MS (decided from memory).",
    ["operation"],
)


class _OverBudget(Exception):
    """A decision's Redis call ran out of its budget (not a failure of Redis's)."""


# KEYS: block, violations, level, bucket.
# ARGV: requests, period (ms), violations before a block (0: never), violation window (ms),
#       forget block history after (ms), block steps (ms, comma-separated).
# Returns {verdict (0 allowed, 1 limited, 2 blocked), remaining, retry_after_ms, reset_ms,
#          violations, block level, 1 if this request started the block, now (unix ms)}.
#
# GCRA: each request moves the bucket's theoretical arrival time (TAT) one emission interval
# (period / requests) ahead; a request is allowed while TAT - now stays within the period
# after the move. A refusal leaves TAT where it was. Refusals are counted in the violation
# window even when blocking is off (0 violations before a block), so the first refusal of a
# burst is known and reported; only a threshold above 0 blocks.
_CHECK_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now / 1000)
local blocked_ms = redis.call('PTTL', KEYS[1])
if blocked_ms > 0 then
  local level = tonumber(redis.call('GET', KEYS[1]) or '1')
  return {2, 0, blocked_ms, blocked_ms, 0, level, 0, now_ms}
end
local requests = tonumber(ARGV[1])
local period = tonumber(ARGV[2]) * 1000
local interval = period / requests
local tat = tonumber(redis.call('GET', KEYS[4]) or '0')
if tat < now then
  tat = now
end
local new_tat = tat + interval
local diff = now - (new_tat - period)
if diff >= 0 then
  local reset_ms = math.ceil((new_tat - now) / 1000)
  redis.call('SET', KEYS[4], string.format('%.0f', new_tat), 'PX', reset_ms)
  return {0, math.floor(diff / interval), 0, reset_ms, 0, 0, 0, now_ms}
end
local retry_ms = math.ceil(-diff / 1000)
local reset_ms = math.ceil((tat - now) / 1000)
local threshold = tonumber(ARGV[3])
local violations = redis.call('INCR', KEYS[2])
if violations == 1 then
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
if threshold == 0 or violations < threshold then
  return {1, 0, retry_ms, reset_ms, violations, 0, 0, now_ms}
end
local level = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
local steps = {}
for step in string.gmatch(ARGV[6], '%d+') do
  steps[#steps + 1] = tonumber(step)
end
local block_ms = steps[math.min(level, #steps)]
redis.call('SET', KEYS[1], level, 'PX', block_ms)
redis.call('DEL', KEYS[2])
return {2, 0, block_ms, block_ms, violations, level, 1, now_ms}
"""

# KEYS: block. Returns {remaining ms (0: not blocked), block level}, in one round trip.
_BLOCKED_LUA = """
local blocked_ms = redis.call('PTTL', KEYS[1])
if blocked_ms > 0 then
  return {blocked_ms, tonumber(redis.call('GET', KEYS[1]) or '1')}
end
return {0, 0}
"""

# KEYS: block, violations, level. Returns 1 when a block was in force.
_LIFT_LUA = """
local blocked = redis.call('EXISTS', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return blocked
"""

_VERDICTS = (Verdict.ALLOWED, Verdict.LIMITED, Verdict.BLOCKED)


class RedisLimiter:
    """`timeout_seconds` bounds the Redis work of each check (None: the shared client's
    timeouts only)."""

    def __init__(self, redis: ResilientRedis, timeout_seconds: float | None = None) -> None:
        if timeout_seconds is not None and not timeout_seconds > 0:
            raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds}")
        self.redis = redis
        self.timeout_seconds = timeout_seconds
        client = redis.client
        self._check = client.register_script(_CHECK_LUA) if client else None
        self._blocked = client.register_script(_BLOCKED_LUA) if client else None
        self._lift = client.register_script(_LIFT_LUA) if client else None
        self.index_key = redis.key("rl", "blocks")

    def keys(self, subject: Subject, route: str) -> list[str]:
        base = self.redis.key("rl", "{" + subject.tag + "}")
        return [f"{base}:block", f"{base}:violations", f"{base}:level", f"{base}:gcra:{route}"]

    def _deadline(self) -> float | None:
        if self.timeout_seconds is None:
            return None
        return asyncio.get_running_loop().time() + self.timeout_seconds

    async def _run(
        self, operation: str, deadline: float | None, fn: Callable[[Redis], Awaitable[T]]
    ) -> T:
        """One Redis call of a decision, through the shared client (its breaker and
        timeouts), ended at `deadline`: RedisUnavailable then, without a breaker failure (see
        the module's docstring)."""

        async def bounded(client: Redis) -> T:
            try:
                async with asyncio.timeout_at(deadline):
                    return await fn(client)
            except TimeoutError as err:
                if asyncio.get_running_loop().time() >= (deadline or 0.0):
                    # Not an error of Redis's: the shared client releases the permit.
                    raise _OverBudget(operation) from err
                raise

        try:
            return await self.redis.run(operation, bounded)
        except _OverBudget as err:
            BUDGET_EXPIRED.labels(operation).inc()
            raise RedisUnavailable(f"{operation}: over the decision's budget") from err

    async def check(
        self, subject: Subject, route: str, limit: Limit, escalation: Escalation
    ) -> CheckResult:
        script = self._check
        if script is None:
            raise RedisUnavailable("REDIS_URL is not set")
        deadline = self._deadline()
        keys = self.keys(subject, route)
        args: list[str | int] = [
            limit.requests,
            limit.period_ms,
            escalation.violations,
            escalation.window_ms,
            escalation.forget_after_ms,
            ",".join(str(ms) for ms in escalation.blocks_ms),
        ]
        reply = await self._run(
            "ratelimit.check", deadline, lambda client: script(keys=keys, args=args, client=client)
        )
        verdict, remaining, retry_ms, reset_ms, violations, level, started, now_ms = map(int, reply)
        if started:
            await self._index(subject, now_ms + retry_ms, deadline)
        return CheckResult(
            _VERDICTS[verdict], remaining, retry_ms, reset_ms, violations, level, bool(started)
        )

    async def _index(self, subject: Subject, until_ms: int, deadline: float | None) -> None:
        """Lists a block just started. The block itself is in force already (the script set
        it), so a failure here does not undo the decision: the block is only missing from
        the list operators read until it ends (it can still be lifted by its subject)."""
        index, member = self.index_key, str(subject)
        try:
            await self._run(
                "ratelimit.index_block",
                deadline,
                lambda client: client.zadd(index, {member: until_ms}),
            )
        except RedisUnavailable:
            log.warning("the block of %s is in force but could not be listed", member)

    async def blocked(self, subject: Subject) -> CheckResult | None:
        script = self._blocked
        if script is None:
            raise RedisUnavailable("REDIS_URL is not set")
        keys = self.keys(subject, "")[:1]
        reply = await self._run(
            "ratelimit.blocked", self._deadline(), lambda client: script(keys=keys, client=client)
        )
        remaining_ms, level = map(int, reply)
        if remaining_ms <= 0:
            return None
        return CheckResult(Verdict.BLOCKED, 0, remaining_ms, remaining_ms, block_level=level)

    async def blocks(self) -> list[Block]:
        if self.redis.client is None:
            raise RedisUnavailable("REDIS_URL is not set")
        index = self.index_key
        now_ms = int(time.time() * 1000)

        async def read(client: Redis) -> list[tuple[bytes | str, float]]:
            await client.zremrangebyscore(index, "-inf", now_ms)
            entries = await client.zrange(index, 0, -1, withscores=True)
            return cast("list[tuple[bytes | str, float]]", entries)

        entries = await self.redis.run("ratelimit.blocks", read)
        found: list[Block] = []
        for member, until in entries:
            subject = Subject.parse(member.decode() if isinstance(member, bytes) else member)
            level = await self._level(subject)
            if level is not None:  # lifted meanwhile: not in force
                found.append(Block(subject, level, int(until), "redis"))
        return found

    async def _level(self, subject: Subject) -> int | None:
        block_key = self.keys(subject, "")[0]
        level = await self.redis.run("ratelimit.block_level", lambda client: client.get(block_key))
        return None if level is None else int(level)

    async def lift(self, subject: Subject) -> bool:
        script = self._lift
        if script is None:
            raise RedisUnavailable("REDIS_URL is not set")
        keys = self.keys(subject, "")[:3]
        lifted = await self.redis.run(
            "ratelimit.lift", lambda client: script(keys=keys, client=client)
        )
        index, member = self.index_key, str(subject)
        await self.redis.run("ratelimit.unindex", lambda client: client.zrem(index, member))
        return bool(lifted)
