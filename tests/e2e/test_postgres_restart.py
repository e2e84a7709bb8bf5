"""PostgreSQL restarts under event load (a private server this test starts on a port of its
own, never the machine's shared one): clients that retry a batch with the same event ids until
it is acknowledged lose nothing and store nothing twice. While the database is away every
answer is 503 with Retry-After (never 500, never a success for rows that did not commit), and
once it is back on the same data directory and port, writes succeed again within seconds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shlex
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from devstack import infra
from devstack.mesh import Mesh
from services.common.migrations import create_database_if_missing, migrate
from tests.e2e.conftest import UNLIMITED, mesh_config

pytestmark = pytest.mark.e2e

CLIENTS = 8
EVENTS_PER_BATCH = 20
# The database stops once this many batches have been acknowledged.
ACKED_BEFORE_STOP = 48
OUTAGE_SECONDS = 3.0
# After the restart, the first batch sent must be acknowledged within this many seconds...
RECOVERY_LIMIT_SECONDS = 10.0
# ... and the load goes on this long after that before it stops.
LOAD_AFTER_RECOVERY_SECONDS = 2.0
# A client gives a batch up after retrying it this long (the test then fails).
BATCH_DEADLINE_SECONDS = 20.0
DATABASE = "genmesh_pg_restart"


class PrivatePostgres:
    """The server of `infra.private_postgres`, stopped (pg_ctl, any shutdown mode) and started
    again on the same data directory and port, with the command line it was started with
    (PostgreSQL keeps it in postmaster.opts)."""

    def __init__(self, server: infra.Server) -> None:
        assert server.origin == "private" and server.workdir is not None
        self.server = server
        self.workdir = server.workdir
        self.data = server.workdir / "data"
        self.port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        self.argv = shlex.split((self.data / "postmaster.opts").read_text())
        assert self.argv[self.argv.index("-p") + 1] == str(self.port), self.argv
        # The pg_ctl of the same installation as the running server.
        self.pg_ctl = str(Path(self.argv[0]).with_name("pg_ctl"))
        # PostgreSQL refuses to run as root: infra runs it as the owner of its folder.
        owner = self.data.owner()
        self.as_user = ["runuser", "-u", owner, "--"] if os.geteuid() == 0 else []

    @property
    def running(self) -> bool:
        return self.server.process is not None and self.server.process.poll() is None

    def stop(self, mode: str) -> None:
        """`pg_ctl stop -m <mode>`: "fast" rolls back and disconnects every session;
        "immediate" quits at once, like a crash, and the next start recovers from the WAL."""
        stopped = subprocess.run(
            [
                *self.as_user,
                self.pg_ctl,
                "-D",
                str(self.data),
                "-m",
                mode,
                "-w",
                "-t",
                "30",
                "stop",
            ],
            capture_output=True,
            text=True,
            timeout=40,
            check=False,
        )
        assert stopped.returncode == 0, stopped.stderr or stopped.stdout
        if self.server.process is not None:
            self.server.process.wait(timeout=15)

    def start(self) -> None:
        assert not self.running
        with (self.workdir / "postgres.log").open("ab") as log:
            process = subprocess.Popen(
                [*self.as_user, *self.argv],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        self.server.process = process
        deadline = time.monotonic() + 30
        while not infra.port_open("127.0.0.1", self.port):
            assert process.poll() is None, f"postgres exited with {process.returncode}"
            assert time.monotonic() < deadline, f"postgres did not listen on {self.port}"
            time.sleep(0.05)

    async def wait_ready(self, timeout: float = 30) -> None:
        """Until the server accepts connections (it listens before it has started up)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = await asyncpg.connect(self.server.url, timeout=2)
            except (OSError, asyncpg.CannotConnectNowError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
            else:
                await conn.close()
                return

    def close(self) -> None:
        """Stop the server if it runs, and remove its folder."""
        if self.running:
            with contextlib.suppress(AssertionError, subprocess.SubprocessError):
                self.stop("fast")
        self.server.stop()


@dataclass(frozen=True)
class Drill:
    url: str
    database_url: str
    postgres: PrivatePostgres
    mesh: Mesh
    log_dir: Path


@pytest.fixture(scope="module")
async def drill(
    redis_url: str, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Drill]:
    server = await asyncio.to_thread(infra.private_postgres, tmp_path_factory.mktemp("pg-restart"))
    postgres: PrivatePostgres | None = None
    mesh: Mesh | None = None
    try:
        postgres = PrivatePostgres(server)
        await postgres.wait_ready()
        database_url = infra.with_database(postgres.server.url, DATABASE)
        await create_database_if_missing(database_url)
        await migrate(database_url)
        log_dir = tmp_path_factory.mktemp("pg-restart-mesh-logs")
        config = mesh_config(
            database_url, redis_url, f"{redis_prefix}pg-restart:", log_dir, **UNLIMITED
        )
        mesh = Mesh(config)
        await asyncio.to_thread(mesh.start)
        yield Drill(config.gateway_url, database_url, postgres, mesh, log_dir)
    finally:
        if mesh is not None:
            await asyncio.to_thread(mesh.stop)
        await asyncio.to_thread(postgres.close if postgres is not None else server.stop)


@dataclass(frozen=True)
class Attempt:
    sent: float  # time.monotonic()
    answered: float
    status: int | None  # None: no HTTP answer (the exception is in `error`)
    error: str = ""
    retry_after: str | None = None
    reason: str = ""
    body: Any = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def kind(self) -> str:
        if self.status is None:
            return f"no answer ({self.error})"
        retry = f"Retry-After {self.retry_after}" if self.retry_after else "no Retry-After"
        return f"{self.status} {self.reason or '-'} {retry}"


@dataclass
class Batch:
    client: int
    ids: list[str]
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def ack(self) -> Attempt | None:
        return next((a for a in self.attempts if a.ok), None)


def error_reason(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    for detail in body.get("details", []):
        if str(detail.get("@type", "")).endswith("google.rpc.ErrorInfo"):
            return str(detail.get("reason", ""))
    return ""


async def post(http: httpx.AsyncClient, batch: Batch) -> Attempt:
    events = [
        {"event_id": event_id, "event": "drill", "session_id": f"pg-restart-{batch.client}"}
        for event_id in batch.ids
    ]
    sent = time.monotonic()
    try:
        r = await http.post("/api/events", json={"events": events})
    except httpx.TransportError as err:
        return Attempt(sent, time.monotonic(), None, error=type(err).__name__)
    try:
        body: Any = r.json()
    except ValueError:
        body = r.text
    return Attempt(
        sent,
        time.monotonic(),
        r.status_code,
        retry_after=r.headers.get("retry-after"),
        reason=error_reason(body),
        body=body,
    )


async def send_until_acknowledged(http: httpx.AsyncClient, batch: Batch) -> None:
    """Retry the same batch (the same event ids) on any 5xx or no answer, with a short backoff
    (shorter than Retry-After: impatient clients are the hard case), until a 2xx. A 4xx ends
    it: the batch itself is wrong."""
    deadline = time.monotonic() + BATCH_DEADLINE_SECONDS
    backoff = 0.1
    while True:
        attempt = await post(http, batch)
        batch.attempts.append(attempt)
        if attempt.ok or (attempt.status is not None and attempt.status < 500):
            return
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
        backoff = min(backoff * 2, 0.5)


class Load:
    """CLIENTS clients, each sending batches one after another until told to stop."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.batches: list[Batch] = []
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def _client(self, n: int) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as http:
            while not self.stopping.is_set():
                batch = Batch(n, [str(uuid.uuid4()) for _ in range(EVENTS_PER_BATCH)])
                self.batches.append(batch)
                await send_until_acknowledged(http, batch)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._client(n)) for n in range(CLIENTS)]

    async def stop(self) -> None:
        """No new batches; the ones under way are retried until acknowledged (or given up)."""
        self.stopping.set()
        try:
            async with asyncio.timeout(BATCH_DEADLINE_SECONDS + 35):
                await asyncio.gather(*self.tasks)
        finally:
            for task in self.tasks:
                task.cancel()

    @property
    def attempts(self) -> list[Attempt]:
        return [a for b in self.batches for a in b.attempts]

    def acknowledged(self) -> int:
        return sum(1 for b in self.batches if b.ack is not None)


async def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """The time check() first held; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s"
        await asyncio.sleep(0.02)
    return time.monotonic()


@dataclass(frozen=True)
class Stored:
    counts: dict[str, int]  # how many times each id sent is in funnel_events
    in_ids: int  # how many of the ids sent are in funnel_event_ids
    duplicated: int  # event ids stored more than once in the whole table


async def stored(database_url: str, ids: list[str]) -> Stored:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """SELECT event_id::text AS id, count(*) AS n FROM funnel_events
               WHERE event_id = ANY($1::uuid[]) GROUP BY event_id""",
            ids,
        )
        in_ids = await conn.fetchval(
            "SELECT count(*) FROM funnel_event_ids WHERE event_id = ANY($1::uuid[])", ids
        )
        duplicated = await conn.fetchval(
            """SELECT count(*) FROM (SELECT event_id FROM funnel_events
               GROUP BY event_id HAVING count(*) > 1) d"""
        )
    finally:
        await conn.close()
    return Stored({r["id"]: r["n"] for r in rows}, in_ids, duplicated)


@dataclass(frozen=True)
class Outage:
    stopping: float  # pg_ctl stop called
    down: float  # the server had stopped
    restarting: float  # the server is being started
    up: float  # it listens again


def answer_problems(load: Load, outage: Outage) -> list[str]:
    problems: list[str] = []
    failures = [a for a in load.attempts if not a.ok]
    if not failures:
        problems.append("the outage went unnoticed: no request failed")
    # Every answer is a success or a 503 that says when to retry: never a 500, never a
    # gateway error or a dropped connection.
    bad = Counter(a.kind for a in failures if a.status != 503 or not a.retry_after)
    if bad:
        problems.append(f"answers other than 503 with Retry-After: {dict(bad)}")
    # Nothing sent after the server had stopped and answered before it started is a success.
    if any(
        a.ok and a.sent >= outage.down and a.answered <= outage.restarting for a in load.attempts
    ):
        problems.append("a batch was acknowledged while the database was down")
    unacknowledged = [b for b in load.batches if b.ack is None]
    if unacknowledged:
        last = Counter(b.attempts[-1].kind for b in unacknowledged)
        problems.append(f"{len(unacknowledged)} batches never acknowledged: {dict(last)}")
    # A request is all-or-nothing: its events are all new or, when an earlier attempt
    # committed but its answer was lost, all duplicates.
    for batch in load.batches:
        ack = batch.ack
        if ack is None:
            continue
        body = ack.body if isinstance(ack.body, dict) else {}
        accepted, duplicates = body.get("accepted", 0), body.get("duplicates", 0)
        if accepted + duplicates != EVENTS_PER_BATCH or accepted not in (0, EVENTS_PER_BATCH):
            problems.append(f"a batch was acknowledged as {ack.body}")
        elif duplicates and batch.attempts[0] is ack:
            problems.append(f"new events were counted as duplicates: {ack.body}")
    return problems


def storage_problems(load: Load, rows: Stored) -> list[str]:
    """Every acknowledged event is stored, once."""
    problems: list[str] = []
    acknowledged = [i for b in load.batches if b.ack is not None for i in b.ids]
    missing = [i for i in acknowledged if i not in rows.counts]
    if missing:
        problems.append(f"{len(missing)} acknowledged events are not stored: {missing[:3]}")
    twice = {i: n for i, n in rows.counts.items() if n != 1}
    if twice or rows.duplicated:
        problems.append(f"events stored more than once: {twice or rows.duplicated}")
    if rows.in_ids != len(rows.counts):
        problems.append(f"{len(rows.counts)} events stored but {rows.in_ids} of their ids")
    return problems


def logged_errors(log_dir: Path) -> Counter[str]:
    """The mesh's logged errors (level ERROR), each as its message and the last line of its
    exception: what to look at when the drill fails."""
    errors: Counter[str] = Counter()
    for log in sorted(log_dir.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("level") == "ERROR":
                    exc = str(entry.get("exc_info", "")).strip().splitlines()
                    errors[f"{log.stem}: {entry.get('message')} | {exc[-1] if exc else ''}"] += 1
    return errors


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_acknowledged_events_are_stored_once_through_a_postgres_restart(
    drill: Drill, mode: str
) -> None:
    started = time.monotonic()
    load = Load(drill.url)
    load.start()
    try:
        await wait_until(
            lambda: load.acknowledged() >= ACKED_BEFORE_STOP, 20, "batches before the stop"
        )
        stopping = time.monotonic()
        await asyncio.to_thread(drill.postgres.stop, mode)
        down = time.monotonic()
        await asyncio.sleep(OUTAGE_SECONDS)
        restarting = time.monotonic()
        await asyncio.to_thread(drill.postgres.start)
        outage = Outage(stopping, down, restarting, time.monotonic())
        recovered = await wait_until(
            lambda: any(a.ok and a.sent >= outage.up for a in load.attempts),
            RECOVERY_LIMIT_SECONDS,
            "a batch sent after the restart acknowledged",
        )
        await asyncio.sleep(LOAD_AFTER_RECOVERY_SECONDS)
    finally:
        await load.stop()
    finished = time.monotonic()

    attempts = load.attempts
    rows = await stored(drill.database_url, [i for b in load.batches for i in b.ids])
    # Requests under way at some time while the server was stopping or stopped.
    touched = [a for a in attempts if a.sent <= outage.restarting and a.answered >= stopping]
    lost_answers = sum(
        1
        for b in load.batches
        if b.ack and isinstance(b.ack.body, dict) and b.ack.body.get("duplicates")
    )
    print(
        f"\npostgres restart ({mode}): {len(load.batches)} batches, {len(attempts)} requests, "
        f"{len(rows.counts)} events stored; stop took {down - stopping:.2f}s, start "
        f"{outage.up - restarting:.2f}s; the first batch sent after the restart was "
        f"acknowledged {recovered - outage.up:.2f}s after it; the drill took "
        f"{finished - started:.1f}s"
        f"\n  answers: {dict(Counter(a.kind for a in attempts))}"
        f"\n  answers to requests the outage touched: {dict(Counter(a.kind for a in touched))}"
        f", slowest {max((a.answered - a.sent for a in touched), default=0):.2f}s"
        f"\n  batches acknowledged as duplicates (an earlier answer lost): {lost_answers}"
    )
    problems = answer_problems(load, outage) + storage_problems(load, rows)
    # The telemetry service and the rest of the mesh are still up.
    dead = [c.name for c in drill.mesh.children if c.process.poll() is not None]
    if dead:
        problems.append(f"mesh processes exited: {dead}")
    if problems:
        errors = logged_errors(drill.log_dir)
        problems += [f"logged {n}x: {error}" for error, n in errors.items()]
    assert not problems, "\n".join(problems)
