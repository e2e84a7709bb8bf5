"""Funnel events in `make bench`: committed events per second through POST /api/events via
Envoy, beside the same kind of load written straight to PostgreSQL one event per INSERT.

- Through the mesh: wrk, `THREADS` threads and `CONNECTIONS` keep-alive connections, each
  request a batch of `EVENTS_PER_REQUEST` new events. The telemetry service answers 2xx only
  once its events are committed, so committed events/s = 2xx answers x EVENTS_PER_REQUEST /
  seconds. Every event id is new (a UUID made in Lua from the run's random prefix, the wrk
  thread and a per-thread counter), so none is a duplicate, and after the runs the rows of each
  run's prefix in funnel_events are counted as a cross-check.
- Row at a time: `CONNECTIONS` asyncpg connections, each running one INSERT per event in
  autocommit, as fast as PostgreSQL answers, for as long; the statement writes what the service
  writes for an event (its funnel_event_ids row and its funnel_events row, the same columns),
  but it is written here, not taken from the service.

- Through the shape's floor, when the run has it (bench/floor_telemetry.py): the same wrk load
  through the floor's Envoy and rate-limit check to a telemetry process that runs the
  service's batch INSERT once per request and nothing else.

The variants alternate round by round after a warm-up of each; the figures are medians. The CPU
time of each process taking part (the load generator, Envoy, quota, telemetry, and the
PostgreSQL backends connected to the bench's database when the server runs on this machine)
says where the time goes. bench/events_report.py prints the figures.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from bench import proc, wrk
from bench.stats import percentile

EVENTS_PER_REQUEST = 50
THREADS = 2
CONNECTIONS = 32

MESH = "POST /api/events via Envoy"
ROWS = "INSERT one event per statement"
FLOOR = "POST /api/events via the floor"
CLIENT = "client (wrk / asyncpg)"
POSTGRES = "postgres backends"

# What the service stores for an event the client sends without user, occurred_at or
# properties beyond these: a guest from 127.0.0.1, stamped on arrival.
EVENT_NAME = "bench_event"
SOURCE = "bench"
LANG = "en"
CLIENT_IP = "127.0.0.1"

# One event, one statement, one transaction (autocommit): the id row and the event row together,
# with the same created_at, as services/telemetry/store.py writes a batch of them.
_INSERT_ONE = """
    WITH new_id AS (
        INSERT INTO funnel_event_ids (event_id) VALUES ($1)
        ON CONFLICT (event_id) DO NOTHING
        RETURNING event_id, created_at
    )
    INSERT INTO funnel_events
        (event_id, user_id, session_id, event, source, lang, properties, client_ip, occurred_at,
         created_at)
    SELECT event_id, $2, $3, $4, $5, $6, $7, $8, $9, created_at FROM new_id"""
_COUNT_PREFIX = "SELECT count(*) FROM funnel_events WHERE event_id BETWEEN $1 AND $2"
_BACKENDS = "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"

# The request wrk sends: EVENTS_PER_REQUEST events, each id new. `setup` runs in wrk's main
# Lua state once per thread and gives each its number; `init` and `request` run in the
# thread's own state. Ids: <run prefix>-<thread>-4000-8000-<counter>, a version-4-shaped UUID.
_LUA = """\
local prefix = "{prefix}"
local per_request = {per_request}
local threads = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function init(args)
  counter = 0
  head = string.format('{{"event_id":"%s-%04x-4000-8000-', prefix, tid)
  tail = string.format(
    '","event":"{event}","session_id":"bench-%04x","source":"{source}","lang":"{lang}",'
    .. '"properties":{{"i":', tid)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  local events = {{}}
  for i = 1, per_request do
    counter = counter + 1
    events[i] = head .. string.format("%012x", counter) .. tail .. i .. "}}}}"
  end
  return wrk.format(nil, nil, nil, '{{"events":[' .. table.concat(events, ",") .. "]}}")
end
"""


def lua_script(prefix: str) -> str:
    """The wrk script for one run; its event ids all start with `prefix` (8 hex digits)."""
    return _LUA.format(
        prefix=prefix, per_request=EVENTS_PER_REQUEST, event=EVENT_NAME, source=SOURCE, lang=LANG
    )


def _prefix_bounds(prefix: str) -> tuple[uuid.UUID, uuid.UUID]:
    return (
        uuid.UUID(f"{prefix}-0000-0000-0000-000000000000"),
        uuid.UUID(f"{prefix}-ffff-ffff-ffff-ffffffffffff"),
    )


class Prefixes:
    """Random 8-hex-digit id prefixes, never the same one twice in a bench run."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def new(self) -> str:
        while (prefix := uuid.uuid4().hex[:8]) in self._used:
            pass
        self._used.add(prefix)
        return prefix


@dataclass
class EventsRun:
    variant: str
    prefix: str
    seconds: float = 0.0
    # Events the client was told are committed: 2xx answers x EVENTS_PER_REQUEST, or INSERTs
    # that stored their row.
    committed: int = 0
    # Requests answered (mesh) or statements completed (row at a time).
    calls: int = 0
    # Non-2xx answers, or statements that failed or stored nothing.
    failed: int = 0
    socket_errors: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    # Rows of this run's prefix in funnel_events, counted after every run was over.
    stored: int | None = None

    @property
    def rate(self) -> float:
        return self.committed / self.seconds if self.seconds else 0.0

    @property
    def stored_rate(self) -> float | None:
        return None if self.stored is None or not self.seconds else self.stored / self.seconds

    def mismatch(self) -> str | None:
        """Why the rows in the table do not tally with what the client was told, or None.
        Through the mesh, the requests in flight when wrk stops (at most one per connection)
        are not counted by wrk but may still commit, so the table may hold up to
        CONNECTIONS x EVENTS_PER_REQUEST more; it may never hold fewer."""
        if self.stored is None:
            return "not counted"
        extra = CONNECTIONS * EVENTS_PER_REQUEST if self.variant != ROWS else 0
        if self.stored < self.committed:
            return f"{self.committed - self.stored} events reported committed are not in the table"
        if self.stored > self.committed + extra:
            return (
                f"{self.stored - self.committed} more rows than events reported committed "
                f"(at most {extra} could come from requests in flight at the end)"
            )
        return None


def _cpu_snapshot(pids: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """CPU seconds used so far by each named group of processes; a process that is gone (or
    not readable) counts as nothing."""
    used: dict[str, float] = {}
    for name, group in pids.items():
        total = 0.0
        for pid in group:
            try:
                total += proc.cpu_seconds(pid)
            except (OSError, ValueError, IndexError):
                continue
        used[name] = total
    return used


def _local_backends(pids: Sequence[int]) -> list[int]:
    """The backend pids that are PostgreSQL processes of this machine (none when the server is
    elsewhere, or /proc is missing)."""
    local = []
    for pid in pids:
        try:
            comm = (proc.PROC / str(pid) / "comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("postgres"):
            local.append(pid)
    return local


def _event_args(prefix: str, worker: int, n: int, now: datetime) -> tuple[object, ...]:
    return (
        f"{prefix}-{worker:04x}-4000-8000-{n:012x}",
        None,
        f"bench-{worker:04x}",
        EVENT_NAME,
        SOURCE,
        LANG,
        f'{{"i": {n % EVENTS_PER_REQUEST + 1}}}',
        CLIENT_IP,
        now,
    )


async def _insert_rows(
    connections: Sequence[asyncpg.Connection], run: EventsRun, seconds: float
) -> None:
    """Every connection INSERTs one event per statement until `seconds` have passed."""
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []

    async def worker(number: int, conn: asyncpg.Connection) -> None:
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            args = _event_args(run.prefix, number, n, datetime.now(UTC))
            started = time.perf_counter()
            try:
                status = await conn.execute(_INSERT_ONE, *args)
            except (asyncpg.PostgresError, OSError):
                run.failed += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            run.calls += 1
            if status == "INSERT 0 1":
                run.committed += 1
            else:
                run.failed += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker(i, conn) for i, conn in enumerate(connections)))
    # Until the last statement came back: the statements counted are the ones completed.
    run.seconds = time.perf_counter() - began
    run.p50_ms = percentile(latencies, 0.50)
    run.p99_ms = percentile(latencies, 0.99)


def _through_envoy(
    wrk_binary: str, url: str, workdir: Path, run: EventsRun, seconds: float
) -> float:
    """One wrk run of fresh events through an Envoy (the mesh's or the floor's); returns the
    CPU seconds wrk used."""
    script = workdir / f"events-{run.prefix}.lua"
    script.write_text(lua_script(run.prefix))
    result, cpu = wrk.run_with_cpu(
        wrk_binary, url, script, seconds, threads=THREADS, connections=CONNECTIONS
    )
    answered_2xx = result.requests - result.non_2xx
    run.seconds = result.seconds
    run.calls = result.requests
    run.committed = answered_2xx * EVENTS_PER_REQUEST
    run.failed = result.non_2xx
    run.socket_errors = result.socket_errors
    run.p50_ms = result.p50_ms
    run.p99_ms = result.p99_ms
    return cpu


@dataclass
class EventsReport:
    runs: list[EventsRun]
    seconds: float
    warmup: float
    server: str
    variants: tuple[str, ...] = (MESH, ROWS)


async def measure(
    wrk_binary: str,
    gateway_url: str,
    database_url: str,
    services: Mapping[str, int],
    workdir: Path,
    rounds: int,
    seconds: float,
    warmup: float,
    floor_url: str | None = None,
) -> EventsReport:
    """Warm each variant up, then alternate them `rounds` times; then count each run's rows.
    With `floor_url`, the shape's floor (bench/floor_server.py) is a third variant; `services`
    then names its processes too."""
    urls = {MESH: f"{gateway_url}/api/events"}
    if floor_url is not None:
        urls[FLOOR] = f"{floor_url}/api/events"
    variants = (MESH, ROWS, FLOOR) if floor_url is not None else (MESH, ROWS)
    prefixes = Prefixes()
    connections = [await asyncpg.connect(database_url) for _ in range(CONNECTIONS)]
    try:
        first = connections[0]
        settings = await first.fetch(
            "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit')"
            " ORDER BY name"
        )
        server = ", ".join(f"{r['name']}={r['setting']}" for r in settings)

        async def backends() -> list[int]:
            return _local_backends([r["pid"] for r in await first.fetch(_BACKENDS)])

        async def one(variant: str, duration: float) -> EventsRun:
            run = EventsRun(variant, prefixes.new())
            groups: dict[str, list[int]] = {name: [pid] for name, pid in services.items()}
            if local := await backends():
                groups[POSTGRES] = local
            if variant == ROWS:
                groups[CLIENT] = [os.getpid()]
            before = _cpu_snapshot(groups)
            if variant in urls:
                client_cpu = await asyncio.to_thread(
                    _through_envoy, wrk_binary, urls[variant], workdir, run, duration
                )
            else:
                await _insert_rows(connections, run, duration)
            after = _cpu_snapshot(groups)
            run.cpu = {name: after[name] - before[name] for name in groups}
            if variant in urls:
                run.cpu[CLIENT] = client_cpu
            return run

        for variant in variants:
            await one(variant, warmup)
        runs = [await one(variant, seconds) for _ in range(rounds) for variant in variants]
        for run in runs:
            run.stored = await first.fetchval(_COUNT_PREFIX, *_prefix_bounds(run.prefix))
    finally:
        await asyncio.gather(*(conn.close() for conn in connections), return_exceptions=True)
    return EventsReport(runs, seconds, warmup, server, variants)
